"""Trace of the training-target covariance with and without Stable Target Field, per time.

    python benchmarks/stf_variance.py [RECIPE] [--n 64 256 1024] [--points 20] [--reps 8]
        [--out docs/img/stf_variance.png] [--json stf_variance.json]

The data distribution is the recipe's training set (transformed once), so that the posterior
p(x0 | x_t) is a softmax over the whole set: E[x0|x_t] and tr Cov[x0|x_t] are exact.  At each
time t of a grid, x0 is drawn from the set and x_t = mu x0 + sigma z, and

- the ordinary target x0 has covariance trace tr Cov[x0 | x_t] (exact, by the softmax);
- the STF target T over a reference batch of n images (x0 among them, the others distinct draws
  from the set) has E||T - E[x0|x_t]||^2 (covariance trace plus squared bias), by Monte Carlo.

Both are reported per dimension in the noise parametrisation the network is trained on
(the eps-target is z + mu (x0 - T)/sigma, so its covariance is mu^2/sigma^2 times that of T),
with the mean effective sample size 1/sum_j w_ij^2 of the STF weights.
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from stcli.components.recipe import load_recipe
from stcli.components.stf import effective_sample_size, stf_mean, stf_weights


def population(recipe, limit: int | None) -> torch.Tensor:
    """The training set as one float64 tensor, transformed once with a fixed generator."""
    data = recipe.data
    items = data.create("train")
    x = torch.stack([items[i] for i in range(len(items) if limit is None else min(limit, len(items)))])
    return data.transform(x, torch.Generator().manual_seed(0)).double()


def variances_at(pop, mu, sig, ns, reps, batch, g):
    """Per-dim eps-target variance (DSM and STF per n) and mean STF ESS per n, at one time."""
    N, d = pop.shape[0], pop[0].numel()
    scale = mu**2 / sig**2 / d
    dsm, stf, ess = [], {n: [] for n in ns}, {n: [] for n in ns}
    for _ in range(reps):
        pick = torch.randperm(N, generator=g)
        x0 = pop[pick[:batch]]
        x = mu * x0 + sig * torch.randn(x0.shape, generator=g, dtype=torch.float64)
        mu_b, sig_b = torch.full((batch,), mu, dtype=torch.float64), torch.full((batch,), sig,
                                                                               dtype=torch.float64)
        w_all = stf_weights(x, mu_b, sig_b, pop)  # the exact posterior over the set
        post_mean = stf_mean(w_all, pop)
        second = w_all @ pop.flatten(1).pow(2).sum(1)
        dsm.append((second - post_mean.pow(2).sum(1)).mean().item() * scale)
        for n in ns:
            rows = min(n, batch)
            reference = torch.cat([x0[:rows], pop[pick[batch:batch + n - rows]]])
            w = stf_weights(x[:rows], mu_b[:rows], sig_b[:rows], reference)
            err = (stf_mean(w, reference) - post_mean[:rows]).pow(2).sum(1)
            stf[n].append(err.mean().item() * scale)
            ess[n].append(effective_sample_size(w).mean().item())
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    return mean(dsm), {n: mean(v) for n, v in stf.items()}, {n: mean(v) for n, v in ess.items()}


def times(sde, t_lo: float, points: int) -> torch.Tensor:
    """Times whose noise-to-signal ratios sigma/mu are about log-spaced from 0.05 (or that of
    t_lo, if larger) to that of T: picked from a dense grid of t."""
    dense = torch.logspace(math.log10(t_lo), math.log10(sde.T), 4000, dtype=torch.float64)
    ratio = (sde.std(dense) / sde.mean_coef(dense)).log()
    wanted = torch.linspace(max(ratio[0].item(), math.log(0.05)), ratio[-1].item(), points)
    return dense[(ratio[None] - wanted[:, None]).abs().argmin(1)]


def plot(rows, ns, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratio = [r["noise_to_signal"] for r in rows]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 3.8))
    top = max(r["dsm"] for r in rows)
    a.loglog(ratio, [r["dsm"] for r in rows], "k-o", ms=3, label="DSM target (z)")
    for n, col in zip(ns, colors):
        a.loglog(ratio, [r["stf"][str(n)] for r in rows], "-o", ms=3, color=col,
                 label=f"STF, n = {n}")
        b.loglog(ratio, [r["stf"][str(n)] / r["dsm"] if r["dsm"] > 1e-9 * top else float("nan")
                         for r in rows], "-o", ms=3, color=col, label=f"n = {n}")
        b.axhline(1 / (n - 1), color=col, ls=":", lw=1)
        c.loglog(ratio, [r["ess"][str(n)] for r in rows], "-o", ms=3, color=col, label=f"n = {n}")
    a.set_ylim(top * 1e-6, top * 3)
    a.set_ylabel("tr Cov(ε-target) / d")
    a.set_title("training-target variance")
    b.set_ylim(bottom=1e-5)
    b.set_ylabel("STF / DSM")
    b.set_title("variance ratio (dotted: 1/(n−1))")
    c.set_ylabel("mean ESS = 1/Σⱼ wᵢⱼ²")
    c.set_title("effective sample size of the STF weights")
    for ax in (a, b, c):
        ax.set_xlabel("noise-to-signal ratio σ(t)/μ(t)")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="recipes/quickstart_digits.yaml")
    p.add_argument("--n", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--points", type=int, default=20)
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="use the first N training images")
    p.add_argument("--out", default="docs/img/stf_variance.png")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = load_recipe(args.recipe)
    sde, pop = recipe.sde, population(recipe, args.limit)
    ns = [n for n in args.n if n <= len(pop) - args.batch]
    g = torch.Generator().manual_seed(recipe.seed)
    t_lo = max(recipe.truncation.eps, 1e-3)
    rows = []
    print(f"{recipe.name}: {len(pop)} training images of dimension {pop[0].numel()}")
    print(f"{'t':>8} {'sigma/mu':>9} {'DSM':>10} " + " ".join(f"{'STF n=' + str(n):>11}" for n in ns)
          + "  " + " ".join(f"{'ESS n=' + str(n):>9}" for n in ns))
    for t in times(sde, t_lo, args.points):
        tt = t.view(1)
        mu, sig = float(sde.mean_coef(tt)), float(sde.std(tt))
        dsm, stf, ess = variances_at(pop, mu, sig, ns, args.reps, args.batch, g)
        rows.append({"t": float(t), "noise_to_signal": sig / mu, "dsm": dsm,
                     "stf": {str(n): v for n, v in stf.items()},
                     "ess": {str(n): v for n, v in ess.items()}})
        print(f"{float(t):8.4f} {sig / mu:9.3g} {dsm:10.4g} "
              + " ".join(f"{stf[n]:11.4g}" for n in ns) + "  "
              + " ".join(f"{ess[n]:9.1f}" for n in ns))
    plot(rows, ns, args.out, f"{recipe.name}: {recipe.sde.name} SDE, {len(pop)} training images")
    print(f"plot: {args.out}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"recipe": recipe.name, "n": ns, "reps": args.reps, "batch": args.batch,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
