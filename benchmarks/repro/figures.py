"""The figures of docs/reproduction.md (matplotlib, PNG).

From the SDE alone: Fig. 7 (quantiles of the importance-weighted time at tau = eps and 0.1)
and Fig. 6c (the importance distribution of lambda = g^2_{P_k}).  From trained checkpoints
(`stcli.jobs.diagnose`): Fig. 1a for several losses, and Figs. 6a/6b.  From the tables: NLL
against sample quality per loss, and sample grids.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stcli.components.sdes import VP  # noqa: E402
from stcli.components.truncation import Hard, Power  # noqa: E402
from stcli.jobs.diagnose import iw_quantiles, lambda_P_density, log_grid  # noqa: E402

EPS = 1e-5
KS = (0.0, 0.5, 0.9, 1.0, 2.0, 3.0)
STYLES = {"k = ∞": {"color": "k", "lw": 2}, "λ = σ": {"color": "k", "ls": "--"}}  # label[:5]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def fig7_quantiles(path: Path, sde=VP()) -> dict:
    """CDFs of p_iw,tau for tau = eps and 0.1 with their quartiles (Q0..Q4), linear and log t."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    out = {}
    for tau, color in ((EPS, "tab:red"), (0.1, "tab:green")):
        t = log_grid(tau, sde.T, 400)
        cdf = sde.importance_cdf(t, tau)
        q = iw_quantiles(sde, tau)
        out[f"{tau:g}"] = q
        for ax in axes:
            ax.plot(t, cdf, color=color, label=f"τ = {tau:g}")
            ax.plot(q, [0, 0.25, 0.5, 0.75, 1.0], "o", color=color)
    axes[0].set(xlabel="t", ylabel="P(t_iw ≤ t)", title="(Fig. 7) importance-weighted time, VP")
    axes[1].set(xscale="log", xlabel="t (log scale)")
    axes[0].legend()
    _save(fig, path)
    return out


def _fig6c_curves(sde, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Densities of t under lambda = g^2_{P_k} (Eq. 10): k = ∞ (likelihood), each k of KS, and
    the variance weighting (uniform)."""
    curves = {"k = ∞ (λ = g²)": lambda_P_density(sde, Hard(eps=EPS), t)}
    curves.update({f"k = {k:g}": lambda_P_density(sde, Power(k=k, eps=EPS), t) for k in KS})
    curves["λ = σ² (uniform)"] = torch.full_like(t, 1 / (sde.T - EPS))
    return curves


def fig6c_lambda_P(path: Path, sde=VP(), below=(1e-3, 1e-2, 0.1)) -> dict:
    """Fig. 6c as the density p(t) and as t p(t) (the density per unit log t, so that areas on
    the log axis are probabilities); returns P(t <= x) of each curve for x in `below`."""
    t = log_grid(EPS, sde.T, 2001)
    curves = _fig6c_curves(sde, t)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    for label, p in curves.items():
        style = STYLES.get(label[:5], {})
        axes[0].loglog(t, p, label=label, **style)
        axes[1].loglog(t, t * p, label=label, **style)
    axes[0].set(xlabel="diffusion time t", ylabel="p(t)", ylim=(1e-3, None),
                title="(Fig. 6c) importance distribution of λ = g²_Pk, VP")
    axes[1].set(xlabel="diffusion time t", ylabel="t · p(t)  (density per unit ln t)",
                ylim=(1e-4, None))
    axes[0].legend(fontsize=8)
    _save(fig, path)
    cdf = {k: torch.cumulative_trapezoid(p, t, dim=0) for k, p in curves.items()}
    return {k: {f"{x:g}": float(c[torch.searchsorted(t, x) - 1]) for x in below}
            for k, c in cdf.items()}


def fig1a_by_loss(results: dict[str, dict], path: Path) -> None:
    """The integrand of L(θ; g², ε) (bits/dim) of one checkpoint per loss."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    for label, res in results.items():
        integ = res["integrand"]
        ax.loglog(integ["t"], np.array(integ["dsm"]) / math.log(2), "o-", ms=2, label=label)
    ax.set(xlabel="diffusion time t", ylabel="bits/dim",
           title="(Fig. 1a) integrand of L(θ; g², ε), digits")
    ax.legend(fontsize=8)
    _save(fig, path)


def tradeoff(rows: list[dict], key: str, label: str, path: Path, title: str) -> None:
    """NLL against the sample-quality score, mean ± s.e. over seeds, one point per loss."""
    fig, ax = plt.subplots(figsize=(6, 4.2), constrained_layout=True)
    median = {k: float(np.median([r[k]["mean"] for r in rows])) for k in ("nll", key)}
    far = [r for r in rows if any(r[k]["mean"] > 2 * median[k] > 0 for k in median)]
    for row in rows:
        if row not in far:  # a far-off loss (P0 on the mixture) would squeeze the rest into a corner
            ax.errorbar(row["nll"]["mean"], row[key]["mean"], xerr=row["nll"]["se"],
                        yerr=row[key]["se"], fmt="o", capsize=3, label=row["label"])
    ax.set(xlabel="NLL (bits/dim, after correction)", ylabel=label, title=title)
    if far:
        ax.text(0.98, 0.02, "off the chart: " + "; ".join(
            f"{r['label']} ({r['nll']['mean']:.3g}, {r[key]['mean']:.3g})" for r in far),
            transform=ax.transAxes, ha="right", va="bottom", fontsize=8)
    ax.legend(fontsize=8)
    _save(fig, path)


def sample_grids(grids: dict[str, np.ndarray], path: Path) -> None:
    """One row of panels: uint8 (N, H, W, C) samples of each loss as a 6x6 grid."""
    fig, axes = plt.subplots(1, len(grids), figsize=(2.6 * len(grids), 2.9), constrained_layout=True)
    for ax, (label, images) in zip(np.atleast_1d(axes), grids.items()):
        ax.imshow(_tile(images[:36, ..., 0], 6), cmap="gray", vmin=0, vmax=255)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    _save(fig, path)


def _tile(images: np.ndarray, cols: int) -> np.ndarray:
    n, h, w = images.shape
    rows = math.ceil(n / cols)
    canvas = np.full((rows * (h + 1), cols * (w + 1)), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    return canvas


def scatter_samples(samples: dict[str, np.ndarray], gmm, path: Path) -> None:
    """toy2d samples of each loss, the mixture's means as crosses."""
    fig, axes = plt.subplots(1, len(samples), figsize=(2.6 * len(samples), 2.9),
                             constrained_layout=True, sharex=True, sharey=True)
    for ax, (label, x) in zip(np.atleast_1d(axes), samples.items()):
        ax.scatter(x[:2000, 0], x[:2000, 1], s=1, alpha=0.4)
        ax.plot(gmm[0][:, 0], gmm[0][:, 1], "rx", ms=5)
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
    _save(fig, path)


def learning_curves(by_loss: dict[str, list[dict]], key: str, label: str, path: Path) -> None:
    """NLL, NELBO (± s.e. over test items) and the sample-quality score (± its s.e.) against
    the training step, one line per loss."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for name, points in by_loss.items():
        steps = [p["step"] for p in points]
        for ax, k in zip(axes[:2], ("nll", "nelbo")):
            ax.errorbar(steps, [p[k]["mean"] for p in points], [p[k]["stderr"] for p in points],
                        fmt="o-", ms=3, capsize=2, label=name)
        axes[2].errorbar(steps, [p[key] for p in points], [p.get(key + "_se", 0.0) for p in points],
                         fmt="o-", ms=3, capsize=2, label=name)
    axes[0].set(ylabel="NLL (bits/dim, test)")
    axes[1].set(ylabel="NELBO (bits/dim, test)")
    axes[2].set(ylabel=label, yscale="log")  # from hundreds at 1,000 steps to a few at the end
    for ax in axes:
        ax.set_xlabel("training step (EMA weights, seed 0)")
    axes[0].legend(fontsize=8)
    _save(fig, path)
