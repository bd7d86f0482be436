"""The `st nll` job: bits/dim of a checkpoint on a data split, before or after correction, and
the NELBO with and without residual, with standard errors over samples and repeats.

Batches are the same whatever the number of processes (rank r takes batches r, r + W, ...),
and each batch's randomness (dequantisation, z, probes, t) comes from a generator seeded by
(seed, repeat, batch), so gathering over processes gives exactly the one-process numbers.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stcli import distributed
from stcli.console import StepProgress, console
from stcli.errors import UserError
from stcli.likelihood import (
    DEFAULT,
    ERROR_NORMS,
    PAPER,
    TIME_VARIABLES,
    NonFiniteError,
    bits_per_dim,
    nelbo,
    nll,
)
from stcli.loading import load_model
from stcli.seeding import generator


@dataclass(frozen=True)
class NllOptions:
    split: str = "test"
    limit: int | None = None
    batch_size: int = 128
    repeats: int = 1
    correction: str = "after"
    divergence: str = "rademacher"
    probes: int = 1
    rtol: float = DEFAULT["rtol"]
    atol: float = DEFAULT["atol"]
    time_variable: str = DEFAULT["time_variable"]
    error_norm: str = DEFAULT["error_norm"]
    nelbo: bool = False
    nelbo_samples: int = 1
    weights: str = "ema"
    seed: int = 0
    device: str = "auto"


@dataclass
class NllResult:
    bpd: dict[str, torch.Tensor] = field(default_factory=dict)  # per evaluated sample
    nfe: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"mean": float(v.mean()), "stderr": float(v.std() / math.sqrt(len(v))),
                    "n": len(v)} for k, v in self.bpd.items()}


def solver_settings(protocol: str, time_variable: str | None, rtol: float | None,
                    atol: float | None, error_norm: str | None = None) -> dict:
    """time_variable, rtol, atol, error_norm of `st nll`: the given ones over those of the protocol
    (default: `likelihood.DEFAULT`; paper: `likelihood.PAPER`, which admits no override)."""
    if protocol not in ("default", "paper"):
        raise UserError(f"--protocol must be one of default, paper, not {protocol!r}")
    given = {"time_variable": time_variable, "rtol": rtol, "atol": atol, "error_norm": error_norm}
    given = {k: v for k, v in given.items() if v is not None}
    if protocol == "paper" and given:
        raise UserError(f"--protocol paper fixes the solver (time variable t, rtol = atol = 1e-5, "
                        f"error norm rms); "
                        f"drop --{'/--'.join(k.replace('_', '-') for k in given)}")
    out = {**(PAPER if protocol == "paper" else DEFAULT), **given}
    if out["time_variable"] not in TIME_VARIABLES:
        raise UserError(f"--time-variable must be one of {', '.join(TIME_VARIABLES)}, not "
                        f"{out['time_variable']!r}")
    if out["error_norm"] not in ERROR_NORMS:
        raise UserError(f"--error-norm must be one of {', '.join(ERROR_NORMS)}, not "
                        f"{out['error_norm']!r}")
    for k in ("rtol", "atol"):
        if not out[k] > 0:
            raise UserError(f"--{k} must be positive, not {out[k]}")
    return out


def bpd_offset(data) -> float:
    """Offset of 8-bit data (uniform dequantisation): 8 on [0, 1], 7 on [-1, 1]; 0 otherwise."""
    if not hasattr(data, "centered"):
        return 0.0
    return 7.0 if data.centered else 8.0


def evaluate(ckpt: str | Path, opts: NllOptions) -> NllResult:
    ctx = distributed.setup(opts.device)
    try:
        return _evaluate(ckpt, opts, ctx)
    finally:
        distributed.teardown()


def _evaluate(ckpt, opts: NllOptions, ctx: distributed.Context) -> NllResult:
    loaded = load_model(ckpt, opts.weights, ctx.device)
    recipe, model, sde = loaded.recipe, loaded.model, loaded.recipe.sde
    data = recipe.data.for_evaluation()
    dataset = data.create(opts.split)
    n = min(len(dataset), opts.limit or len(dataset))
    batches = [list(range(i, min(i + opts.batch_size, n))) for i in range(0, n, opts.batch_size)]
    mine = batches[ctx.rank::ctx.world_size]
    eps, offset, dim = recipe.truncation.eps, bpd_offset(data), data.dim
    keys = [f"nll_{opts.correction}"] + (["nelbo", "nelbo_residual"] if opts.nelbo else [])
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    order, nfes, t0 = [], [], time.perf_counter()  # order: (repeat, index) of every row
    total = opts.repeats * len(mine)
    with StepProgress("nll", total, enabled=ctx.is_main) as progress:
        for r in range(opts.repeats):
            for j, idx in enumerate(mine):
                b = ctx.rank + j * ctx.world_size
                g = generator(ctx.device, opts.seed, "nll", r, b)
                x = data.transform(torch.stack([dataset[i] for i in idx]).to(ctx.device), g)
                try:
                    vals, nfe = nll(model.score, sde, x, eps=eps, correction=opts.correction,
                                    divergence=opts.divergence, probes=opts.probes,
                                    rtol=opts.rtol, atol=opts.atol,
                                    time_variable=opts.time_variable,
                                    error_norm=opts.error_norm, generator=g)
                except NonFiniteError as err:
                    raise UserError(f"the probability-flow ODE produced non-finite values for "
                                    f"sample(s) {[idx[i] for i in err.samples][:10]} of the "
                                    f"{opts.split} split at t = {err.t:.6g}") from None
                _check_finite(vals, idx, "the ODE likelihood")
                rows[keys[0]].append(bits_per_dim(vals, dim, offset))
                if opts.nelbo:
                    for key, res in (("nelbo", False), ("nelbo_residual", True)):
                        v = nelbo(model.score, sde, x, eps=eps, samples=opts.nelbo_samples,
                                  residual=res, generator=g)
                        rows[key].append(bits_per_dim(v, dim, offset))
                nfes.append((r * len(batches) + b, nfe))
                order.append(torch.tensor([r * n + i for i in idx], device=ctx.device))
                done = r * len(mine) + j + 1
                mean = float(torch.cat(rows[keys[0]]).mean())
                rate = done * opts.batch_size / (time.perf_counter() - t0)
                progress.update(done, {"bpd": f"{mean:.4f}", "img/s": f"{rate:.1f}",
                                       "nfe": str(nfe)}, force=done == total)
    return gather(rows, order, nfes, ctx, time.perf_counter() - t0)


def gather(rows, order, nfes, ctx, seconds: float) -> NllResult:
    """Every rank's rows in (repeat, index) order: the numbers one process would give."""
    def cat(parts, **kw):
        return torch.cat(parts) if parts else torch.zeros(0, **kw)

    perm = distributed.all_gather_rows(cat(order, dtype=torch.long, device=ctx.device)).argsort()
    result = NllResult(seconds=seconds)
    for k, parts in rows.items():
        result.bpd[k] = distributed.all_gather_rows(cat(parts, device=ctx.device))[perm].cpu()
    batch_nfe = distributed.all_gather_rows(torch.tensor(nfes, device=ctx.device).view(-1, 2))
    result.nfe = batch_nfe[batch_nfe[:, 0].argsort(), 1].tolist()
    return result


def _check_finite(values: torch.Tensor, idx: list[int], what: str) -> None:
    bad = [i for i, v in zip(idx, values.tolist()) if not math.isfinite(v)]
    if bad:
        raise UserError(f"{what} is not finite for sample(s) {bad[:10]} of the split; the model "
                        "or checkpoint is broken, or try a lower --rtol/--atol")


def report(result: NllResult, opts: NllOptions, ckpt, json_path: Path | None) -> None:
    from rich.table import Table

    table = Table(title=f"{ckpt} ({opts.split}, {opts.repeats} repeat(s))")
    for col in ("quantity", "bits/dim", "± s.e.", "samples"):
        table.add_column(col, justify="right" if col != "quantity" else "left")
    for k, s in result.summary().items():
        table.add_row(k, f"{s['mean']:.4f}", f"{s['stderr']:.4f}", str(s["n"]))
    console.print(table)
    nfe = sum(result.nfe) / max(len(result.nfe), 1)
    console.print(f"mean NFE per batch {nfe:.0f}; {result.seconds:.1f} s")
    if json_path:
        payload = {"checkpoint": str(ckpt), "settings": opts.__dict__, "summary": result.summary(),
                   "nfe_per_batch": result.nfe, "seconds": result.seconds,
                   "per_sample_bpd": {k: v.tolist() for k, v in result.bpd.items()}}
        json_path.write_text(json.dumps(payload, indent=1))
