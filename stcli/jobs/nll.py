"""The `st nll` job: bits/dim of a checkpoint on a data split, before or after correction, and
the NELBO with and without residual, with standard errors over samples and repeats.

Batches are the same whatever the number of processes (rank r takes batches r, r + W, ...),
and each batch's randomness (dequantisation, z, probes, t) comes from a generator seeded by
(seed, repeat, batch), so gathering over processes gives exactly the one-process numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from stcli.components.likelihood import (
    ERROR_NORMS,
    PROTOCOLS,
    TIME_VARIABLES,
    NonFiniteError,
    bits_per_dim,
    nelbo,
    nll,
)
from stcli.components.loading import load_model
from stcli.infra import distributed
from stcli.infra.console import StepProgress, console
from stcli.infra.errors import UserError
from stcli.infra.outputs import json_text, write_result
from stcli.infra.seeding import generator
from stcli.infra.solvers import StepLimitError


@dataclass(frozen=True)
class NllOptions:
    """`st nll`'s settings; None takes the checkpoint recipe's eval.nll value (see resolve)."""

    split: str = "test"
    limit: int | None = None
    batch_size: int = 128
    repeats: int | None = None  # None: the recipe's eval.nll value (see resolve)
    eps: float | None = None
    correction: str | None = None
    divergence: str | None = None
    probes: int | None = None
    rtol: float | None = None
    atol: float | None = None
    time_variable: str | None = None
    error_norm: str | None = None
    nelbo: bool = False
    nelbo_samples: int = 1
    solver_check: int = 16  # items solved again at 100x tighter tolerances (0: none)
    weights: str = "ema"
    seed: int = 0
    device: str = "auto"


def resolve(opts: NllOptions, recipe) -> NllOptions:
    """Options left unset (None) filled in from the recipe's eval.nll section; eps defaults to
    eval.nll.eps, else the training eps.  The integration interval [eps, T] must be valid."""
    cfg, sde = recipe.eval.nll, recipe.sde
    defaults = {"repeats": cfg.repeats, "eps": recipe.nll_eps, "correction": cfg.correction,
                "divergence": cfg.hutchinson, "probes": cfg.probes, "rtol": cfg.rtol,
                "atol": cfg.atol, "time_variable": cfg.time_variable, "error_norm": cfg.error_norm}
    out = replace(opts, **{k: v if getattr(opts, k) is None else getattr(opts, k)
                           for k, v in defaults.items()})
    if not 0 < out.eps < sde.T:
        raise UserError(f"--eps must lie in (0, T = {sde.T}), got {out.eps}")
    return out


@dataclass
class NllResult:
    bpd: dict[str, torch.Tensor] = field(default_factory=dict)  # per evaluated sample
    nfe: list[int] = field(default_factory=list)
    seconds: float = 0.0
    options: NllOptions | None = None  # the settings used (recipe defaults filled in)
    solver: dict | None = None  # the solver's own error of the mean, estimated (solver_error)

    def summary(self) -> dict[str, dict[str, float | int | None]]:
        """Mean and standard error over images: the repeats of one image (rows in (repeat,
        index) order) are averaged first, as they are not independent draws of the data.
        stderr is None (JSON null) where one image leaves no spread to estimate."""
        repeats = self.options.repeats if self.options else 1
        out = {}
        for k, v in self.bpd.items():
            per_image = v.view(repeats, -1).mean(0)
            n = len(per_image)
            se = float(per_image.std() / math.sqrt(n)) if n > 1 else None
            out[k] = {"mean": float(v.mean()), "stderr": se, "n": n, "repeats": repeats}
        return out


def solver_settings(protocol: str, time_variable: str | None, rtol: float | None,
                    atol: float | None, error_norm: str | None = None) -> dict:
    """time_variable, rtol, atol, error_norm given to `st nll`, checked: unset ones stay None (the
    recipe's eval.nll fills them in); `--protocol paper|fast` is `likelihood.PROTOCOLS[...]`,
    with no override."""
    if protocol not in ("default", *PROTOCOLS):
        raise UserError(f"--protocol must be one of default, {', '.join(PROTOCOLS)}, not {protocol!r}")
    given = {"time_variable": time_variable, "rtol": rtol, "atol": atol, "error_norm": error_norm}
    named = [k for k, v in given.items() if v is not None]
    if protocol in PROTOCOLS:
        fixed = PROTOCOLS[protocol]
        if named:
            flags = "/--".join(k.replace("_", "-") for k in named)
            raise UserError(f"--protocol {protocol} fixes the solver (time variable "
                            f"{fixed['time_variable']}, rtol = atol = {fixed['rtol']:g}, error norm "
                            f"{fixed['error_norm']}); drop --{flags}")
        return dict(fixed)
    if time_variable is not None and time_variable not in TIME_VARIABLES:
        raise UserError(f"--time-variable must be one of {', '.join(TIME_VARIABLES)}, not "
                        f"{time_variable!r}")
    if error_norm is not None and error_norm not in ERROR_NORMS:
        raise UserError(f"--error-norm must be one of {', '.join(ERROR_NORMS)}, not {error_norm!r}")
    for k in ("rtol", "atol"):
        if given[k] is not None and not given[k] > 0:  # also refuses nan
            raise UserError(f"--{k} must be a positive number, got {given[k]}")
    return given


def evaluate(ckpt: str | Path, opts: NllOptions) -> NllResult:
    for name in ("rtol", "atol"):
        value = getattr(opts, name)
        if value is not None and not value > 0:  # also refuses nan
            raise UserError(f"--{name} must be a positive number, got {value}")
    ctx = distributed.setup(opts.device)
    try:
        return _evaluate(ckpt, opts, ctx)
    finally:
        distributed.teardown()


def _evaluate(ckpt, opts: NllOptions, ctx: distributed.Context) -> NllResult:
    with distributed.checked(ctx, "read its inputs"):
        loaded = load_model(ckpt, opts.weights, ctx.device)
        recipe, model, sde = loaded.recipe, loaded.model, loaded.recipe.sde
        opts = replace(resolve(opts, recipe), weights=loaded.weights)  # an export's one set
        data = recipe.data.for_evaluation()
        dataset = data.create(opts.split)
    distributed.same_everywhere(f"{ckpt}|{opts!r}", ctx, "st nll settings")
    n = min(len(dataset), opts.limit or len(dataset))
    batches = [list(range(i, min(i + opts.batch_size, n))) for i in range(0, n, opts.batch_size)]
    mine = batches[ctx.rank::ctx.world_size]
    eps, offset, dim = opts.eps, data.bpd_offset(), data.dim
    keys = [f"nll_{opts.correction}"] + (["nelbo", "nelbo_residual"] if opts.nelbo else [])
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    order, nfes, t0 = [], [], time.perf_counter()  # order: (repeat, index) of every row
    total = opts.repeats * len(mine)
    with distributed.checked(ctx, "evaluate its share of the images"), \
            StepProgress("nll", total, enabled=ctx.is_main) as progress:
        for r in range(opts.repeats):
            for j, idx in enumerate(mine):
                b = ctx.rank + j * ctx.world_size
                g = generator(ctx.device, opts.seed, "nll", r, b)
                x = data.transform(torch.stack([dataset[i] for i in idx]).to(ctx.device), g)
                try:
                    vals, nfe = nll(progress.beating(model.score), sde, x, eps=eps,
                                    correction=opts.correction,
                                    divergence=opts.divergence, probes=opts.probes,
                                    rtol=opts.rtol, atol=opts.atol,
                                    time_variable=opts.time_variable,
                                    error_norm=opts.error_norm, generator=g)
                except NonFiniteError as err:
                    raise UserError(f"the probability-flow ODE produced non-finite values for "
                                    f"sample(s) {[idx[i] for i in err.samples][:10]} of the "
                                    f"{opts.split} split at t = {err.t:.6g}") from None
                except StepLimitError as err:
                    raise UserError(f"the likelihood ODE for samples {idx[0]}-{idx[-1]}: {err}; "
                                    "loosen --rtol/--atol") from None
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
    result = gather(rows, order, nfes, ctx, time.perf_counter() - t0)
    result.options = opts
    if ctx.is_main and opts.solver_check and mine:
        result.solver = solver_error(model.score, sde, data, dataset, mine[0][:opts.solver_check],
                                     opts, offset, ctx.device)
    return result


SOLVER_CHECK_FACTOR = 100.0  # 10x tighter is not enough: a loose step control can miss features


def solver_error(score, sde, data, dataset, idx: list[int], opts: NllOptions, offset: float,
                 device) -> dict:
    """The solver's own error of the mean bits/dim, estimated: items `idx` solved twice, at the
    run's tolerances and at SOLVER_CHECK_FACTOR times tighter ones, with the same dequantisation
    and probes (so the difference is the solver's alone); mean and s.e. of the difference."""
    out = []
    for rtol, atol in ((opts.rtol, opts.atol),
                       (opts.rtol / SOLVER_CHECK_FACTOR, opts.atol / SOLVER_CHECK_FACTOR)):
        g = generator(device, opts.seed, "nll-solver-check")
        x = data.transform(torch.stack([dataset[i] for i in idx]).to(device), g)
        vals, _ = nll(score, sde, x, eps=opts.eps, correction=opts.correction,
                      divergence=opts.divergence, probes=opts.probes, rtol=rtol, atol=atol,
                      time_variable=opts.time_variable, error_norm=opts.error_norm, generator=g)
        out.append(bits_per_dim(vals, data.dim, offset).double().cpu())
    diff = out[0] - out[1]
    se = float(diff.std() / math.sqrt(len(diff))) if len(diff) > 1 else None
    return {"n": len(idx), "mean_diff": float(diff.mean()), "stderr": se,
            "max_abs_diff": float(diff.abs().max()), "tighter_by": SOLVER_CHECK_FACTOR}


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


def _se(value: float | None) -> str:
    return "n/a (one image)" if value is None else f"{value:.4f}"


def report(result: NllResult, opts: NllOptions, ckpt, json_path: Path | None) -> None:
    from rich.table import Table

    opts = result.options or opts

    table = Table(title=f"{ckpt} ({opts.split}, {opts.repeats} repeat(s))")
    for col in ("quantity", "bits/dim", "± s.e. over images", "images"):
        table.add_column(col, justify="right" if col != "quantity" else "left")
    summary = result.summary()
    for k, s in summary.items():
        table.add_row(k, f"{s['mean']:.4f}", _se(s["stderr"]), str(s["n"]))
    console.print(table)
    nfe = sum(result.nfe) / max(len(result.nfe), 1)
    console.print(f"mean NFE per batch {nfe:.0f}; {result.seconds:.1f} s; integrated from "
                  f"eps = {opts.eps:g} to T, correction {opts.correction}")
    if result.solver:
        c = result.solver
        console.print(f"solver error of the mean, estimated on {c['n']} items solved again at "
                      f"{c['tighter_by']:g}x tighter tolerances: {c['mean_diff']:+.4f} ± "
                      f"{_se(c['stderr'])} bits/dim (largest item {c['max_abs_diff']:.4f}); beside "
                      f"the standard error over images, {_se(next(iter(summary.values()))['stderr'])}")
    if json_path:
        payload = {"checkpoint": str(ckpt), "settings": opts.__dict__, "summary": summary,
                   "nfe_per_batch": result.nfe, "seconds": result.seconds,
                   "solver_error": result.solver,
                   "per_sample_bpd": {k: v.tolist() for k, v in result.bpd.items()}}
        write_result(json_path, json_text(payload), "result")
