"""`st diagnose CKPT`: where along diffusion time the variational bound and the training loss
of a trained model live (Figs. 1a, 6a, 6b of the paper), and how its SDE and truncation
distribute the training time (Figs. 6c, 7).

With x_t = mu(t) x0 + sigma(t) z, grad log p_0t(x_t | x0) = -z / sigma(t) (Sec. 3.1), so
sigma (s_theta - grad log p_0t) = sigma s_theta + z.  Per data dimension D:

* Fig. 1a — the integrand of L(theta; g^2, eps) = 1/2 int g^2 E||s_theta - grad log p_0t||^2 dt
  (Eqs. 5-6, DSM form):  I(t) = 1/2 g^2/sigma^2 E||sigma s_theta + z||^2 / D.  It grows like
  g^2/sigma^2 ~ 1/t as t -> 0 for every continuous score (App. A.2).  Without its data-free
  part 1/2 g^2/sigma^2 E||z||^2/D it becomes the integrand of the NELBO's first term
  (`stcli.components.likelihood.nelbo`, Eq. 17), which stays bounded.
* Fig. 6a — the per-sample Monte Carlo loss sigma^2 ||s_theta - grad log p_0t||^2 / D at
  t ~ p_iw,eps (importance sampling, Sec. 4.1).
* Fig. 6b — the per-sample loss of Eq. (9), 1/2 Z_tau ||sigma s_theta + z||^2 / D, at
  t ~ p_iw,tau for several truncation times tau.
* Fig. 7 — quantiles of p_iw,tau: t_u = A^{-1}(A(tau) + u Z_tau), A the antiderivative of g^2/sigma^2.
* Fig. 6c — the importance distribution of lambda = g^2_P (Eq. 10): p(t) ∝ F_P(t) g^2/sigma^2 on
  [eps, T], whose normaliser int F_P g^2/sigma^2 dt equals E_{tau~P}[Z_tau] (Fubini).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from stcli.components.sdes import LinearSDE, ScoreFn, bcast, sum_squares
from stcli.infra.console import console, info
from stcli.infra.errors import UserError
from stcli.infra.outputs import json_text, output_file, output_folder, write_result
from stcli.infra.runlock import atomic
from stcli.infra.seeding import generator

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)  # Fig. 7: Q0..Q4


@dataclass(frozen=True)
class DiagnoseOptions:
    split: str = "test"
    limit: int = 256  # data points x0 used for every t
    points: int = 40  # log-spaced t grid on [eps, T] (Fig. 1a)
    samples: int = 512  # Monte Carlo draws of (t, x0, z) per tau (Figs. 6a/6b)
    taus: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # truncation times of Fig. 6b, besides eps
    batch_size: int = 256
    weights: str = "ema"
    seed: int = 0
    device: str = "auto"


# --- the math ------------------------------------------------------------------------------------
def log_grid(eps: float, T: float, points: int) -> torch.Tensor:
    """`points` times from eps to T, equally spaced in log t (float64)."""
    return torch.logspace(math.log10(eps), math.log10(T), points, dtype=torch.float64)


def scaled_error(score_fn: ScoreFn, sde: LinearSDE, x0: torch.Tensor, t: torch.Tensor,
                 z: torch.Tensor, batch_size: int) -> torch.Tensor:
    """||sigma(t) s_theta(x_t, t) + z||^2 / D per sample = sigma^2 ||s_theta - grad log p_0t||^2 / D."""
    out = []
    for xs, ts, zs in zip(x0.split(batch_size), t.split(batch_size), z.split(batch_size)):
        x_t = sde.marginal(xs, ts, zs)
        out.append(sum_squares((bcast(sde.std(ts), xs) * score_fn(x_t, ts) + zs).double()) / xs[0].numel())
    return torch.cat(out)


def _mean_se(v: torch.Tensor) -> tuple[float, float]:
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else 0.0


@torch.no_grad()
def bound_integrand(score_fn: ScoreFn, sde: LinearSDE, x0: torch.Tensor, t_grid: torch.Tensor,
                    gen: torch.Generator | None = None, batch_size: int = 256) -> dict:
    """Fig. 1a: per-dimension integrand of L(theta; g^2, eps) at each t of the grid (nats), in
    the DSM form 1/2 g^2/sigma^2 E||sigma s + z||^2/D and without its data-free part (the NELBO
    form, 1/2 g^2/sigma^2 E[||sigma s + z||^2 - ||z||^2]/D); means and standard errors over x0."""
    rows = {"dsm": [], "dsm_se": [], "nelbo": [], "nelbo_se": []}
    for t in t_grid.tolist():
        tt = torch.full((len(x0),), t, dtype=torch.float64, device=x0.device)
        z = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        err = scaled_error(score_fn, sde, x0, tt, z, batch_size)
        c = 0.5 * float(sde.g2(tt[:1]) / sde.var(tt[:1]))  # 1/2 g^2 / sigma^2
        for key, v in (("dsm", c * err), ("nelbo", c * (err - sum_squares(z.double()) / z[0].numel()))):
            rows[key].append(_mean_se(v)[0])
            rows[f"{key}_se"].append(_mean_se(v)[1])
    return {"t": t_grid.tolist(), **rows}


@torch.no_grad()
def iw_losses(score_fn: ScoreFn, sde: LinearSDE, x0: torch.Tensor, tau: float, n: int,
              gen: torch.Generator | None = None, batch_size: int = 256) -> dict:
    """Figs. 6a/6b: n draws t ~ p_iw,tau with x0 cycling through the data; per sample the scaled
    error sigma^2||s - grad log p_0t||^2/D and the loss of Eq. (9), 1/2 Z_tau times it."""
    t, big_z = sde.sample_time(n, tau, generator=gen, device=x0.device, dtype=torch.float64)
    rows = x0[torch.arange(n, device=x0.device) % len(x0)]
    z = torch.randn(rows.shape, generator=gen, device=x0.device, dtype=x0.dtype)
    err = scaled_error(score_fn, sde, rows, t, z, batch_size)
    return {"tau": tau, "Z": float(big_z), "t": t.tolist(), "scaled_error": err.tolist(),
            "loss": (0.5 * float(big_z) * err).tolist()}


def iw_quantiles(sde: LinearSDE, tau: float, levels: Sequence[float] = LEVELS) -> list[float]:
    """Fig. 7: the u-quantiles of p_iw,tau ∝ g^2/sigma^2 on [tau, T], t_u = A^{-1}(A(tau) + u Z_tau)."""
    u = torch.tensor(levels, dtype=torch.float64)
    a = sde.antiderivative(torch.tensor(tau, dtype=torch.float64)) + u * sde.importance_Z(tau)
    return sde.antiderivative_inv(a).clamp(tau, sde.T).tolist()


def lambda_P_density(sde: LinearSDE, truncation, t: torch.Tensor, nodes: int = 20001) -> torch.Tensor:
    """Fig. 6c: the importance distribution of lambda = g^2_P (Eq. 10) on [eps, T],
    p(t) = F_P(t) g^2(t)/sigma^2(t) / N, N = int_eps^T F_P g^2/sigma^2 dt (trapezoid in log t)."""
    def unnormalised(s):
        s = s.to(torch.float64)
        return truncation.cdf(s).to(torch.float64) * sde.g2(s) / sde.var(s)

    grid = log_grid(truncation.eps, sde.T, nodes)
    norm = torch.trapezoid(unnormalised(grid) * grid, grid.log())
    return unnormalised(t) / norm


# --- the job -------------------------------------------------------------------------------------
def _data(recipe, opts: DiagnoseOptions, device) -> torch.Tensor:
    """The first `limit` items of the split, as the model sees them (uniform dequantisation)."""
    data = recipe.data.for_evaluation()
    dataset = data.create(opts.split)
    n = min(len(dataset), opts.limit)
    if n < opts.limit:
        info(f"--limit {opts.limit}: the {opts.split} split holds {n} items; using them all")
    x = torch.stack([dataset[i] for i in range(n)]).to(device)
    return data.transform(x, generator(device, opts.seed, "diagnose", "data"))


def _check(opts: DiagnoseOptions) -> None:
    if opts.weights not in ("ema", "raw"):
        raise UserError(f"--weights must be ema or raw, got {opts.weights!r}")
    for name in ("limit", "points", "samples", "batch_size"):
        if getattr(opts, name) < (2 if name in ("limit", "points") else 1):
            raise UserError(f"--{name.replace('_', '-')} is too small: {getattr(opts, name)}")


def _check_taus(taus: Sequence[float], eps: float, T: float) -> None:
    bad = [tau for tau in taus if not eps <= tau < T]
    if bad:
        raise UserError(f"--tau must lie in [eps, T) = [{eps:g}, {T:g}), got {bad}")


def diagnose(ckpt: str | Path, opts: DiagnoseOptions = DiagnoseOptions()) -> dict:
    """Every number of `st diagnose` for checkpoint `ckpt`, as JSON-ready data."""
    from stcli.components.loading import load_model
    from stcli.infra.distributed import pick_device

    _check(opts)
    device = pick_device(opts.device)
    loaded = load_model(ckpt, opts.weights, device)
    recipe, model, sde = loaded.recipe, loaded.model, loaded.recipe.sde
    eps = recipe.truncation.eps
    _check_taus(opts.taus, eps, sde.T)
    t0 = time.perf_counter()
    x0 = _data(recipe, opts, device)
    gen = generator(device, opts.seed, "diagnose")
    taus = sorted({eps, *opts.taus})
    t_fine = log_grid(eps, sde.T, 200)
    return {
        "checkpoint": str(ckpt), "step": loaded.step, "eps": eps, "dim": x0[0].numel(),
        "n_data": len(x0),  # the items used: --limit, or fewer if the split is smaller
        "settings": {**asdict(opts), "taus": taus, "weights": loaded.weights},
        "integrand": bound_integrand(model.score, sde, x0, log_grid(eps, sde.T, opts.points),
                                     gen, opts.batch_size),
        "iw": [iw_losses(model.score, sde, x0, tau, opts.samples, gen, opts.batch_size)
               for tau in taus],
        "quantiles": {"levels": list(LEVELS),
                      "tau": {f"{tau:g}": iw_quantiles(sde, tau) for tau in (eps, 0.1)}},
        "lambda_P": {"truncation": recipe.truncation.model_dump(mode="json"), "t": t_fine.tolist(),
                     "density": lambda_P_density(sde, recipe.truncation, t_fine).tolist()},
        "seconds": time.perf_counter() - t0,
    }


# --- output --------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    """Figs. 1a, 6a and 6b of the checkpoint side by side, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    integ = result["integrand"]
    bpd = [v / math.log(2) for v in integ["dsm"]]
    axes[0].loglog(integ["t"], bpd, "o-", ms=3)
    axes[0].set(xlabel="diffusion time t", ylabel="bits/dim",
                title="(Fig. 1a) integrand of L(θ; g², ε)")
    first = result["iw"][0]
    axes[1].scatter(first["t"], first["scaled_error"], s=3, alpha=0.5)
    axes[1].set(xscale="log", yscale="log", xlabel="t ~ p_iw,ε",
                ylabel="σ²‖s_θ − ∇log p₀ₜ‖² / D", title="(Fig. 6a) Monte Carlo loss per time")
    for row in result["iw"]:
        axes[2].scatter(row["t"], row["loss"], s=3, alpha=0.5, label=f"τ = {row['tau']:g}")
    axes[2].set(xscale="log", yscale="log", xlabel="t ~ p_iw,τ",
                ylabel="½ Z_τ ‖σ s_θ + z‖² / D", title="(Fig. 6b) loss of Eq. (9) per τ")
    axes[2].legend(markerscale=4)
    fig.suptitle(f"{result['checkpoint']} (step {result['step']})", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)


FILES = ("diagnose.json", "diagnose.png")


def check_out(out: Path, overwrite: bool = False) -> None:
    """Refuse an --out that is a file, cannot be written or holds earlier results (unless
    `overwrite`), before any computing."""
    output_folder(out, "--out")
    for name in FILES:
        if (out / name).exists():
            output_file(out / name, f"--out {out}: its", overwrite=overwrite)


def write(result: dict, out: Path) -> tuple[Path, Path]:
    """diagnose.json and diagnose.png in `out`."""
    json_path, png = (out / name for name in FILES)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        console.out(json_text(result, indent=None).strip(), highlight=False)
        raise UserError(f"cannot make --out {out} ({err.strerror}); the results are printed "
                        "above") from None
    write_result(json_path, json_text(result), "results")
    plot(result, png)
    return json_path, png


def report(result: dict, files: tuple[Path, Path], as_json: bool) -> None:
    """The table (or the JSON itself) on stdout."""
    if as_json:
        console.out(json_text(result, indent=None).strip(), highlight=False)
        return
    from rich.table import Table

    integ = result["integrand"]
    table = Table(title=f"integrand of L(θ; g², ε) per dimension, {result['checkpoint']}")
    for col in ("t", "DSM bits/dim", "± s.e.", "NELBO form bits/dim"):
        table.add_column(col, justify="right")
    n = len(integ["t"])
    for i in sorted({round(j * (n - 1) / 8) for j in range(9)}):
        table.add_row(f"{integ['t'][i]:.3g}", *(f"{integ[k][i] / math.log(2):.4g}"
                                                   for k in ("dsm", "dsm_se", "nelbo")))
    console.print(table)
    for row in result["iw"]:
        loss = torch.tensor(row["loss"])
        q = torch.tensor(row["t"], dtype=torch.float64).quantile(
            torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        console.print(f"τ = {row['tau']:.3g}: Z_τ {row['Z']:.4g}, mean loss {loss.mean():.4g} "
                      f"(max {loss.max():.4g}), t quartiles {', '.join(f'{v:.3g}' for v in q)}")
    console.print(f"wrote {files[0]} and {files[1]} ({result['seconds']:.1f} s)")
