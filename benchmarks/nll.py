"""NFE, accuracy and wall time of the likelihood ODE per time variable and tolerance, against
scipy.integrate.solve_ivp(method="RK45") at rtol = atol = 1e-5 in t (the paper's protocol, on the
flattened batch with a device -> numpy round trip per evaluation), measured in the same run.

    python benchmarks/nll.py --ckpt runs/q/ckpt.safetensors --ckpt runs/toy/ckpt.safetensors \
        [--batch 4] [--tols 1e-2 3e-3 1e-3 1e-4] [--ref-tol 3e-7] [--plot docs/img/nll_nfe.png]

--norms max is `stcli.infra.solvers.max_norm` (the largest per-sample RMS of each part of the state)
with the log-density held to --logp-tols bits/dim on its own (`likelihood.nll(logp_tol=...)`).
With --cache the reference and the scipy solve are kept and reused (their NFE are exact; the
wall time is that of the run that made them).  --rows re-tabulates and re-plots saved --json rows.

Every solve uses the same data (one dequantisation draw), the same Rademacher probe and
`correction before`, so the solvers differ only by their discretisation error.  |dNLL| is the
largest per-sample difference to the tight reference (st's dopri5 in t at --ref-tol), in
bits/dim.  Without --ckpt a fresh quickstart U-Net (random weights) is used; --quick runs only
the paper's protocol, scipy and the default.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.integrate import solve_ivp

from stcli.components.likelihood import (
    DEFAULT,
    ERROR_NORMS,
    TIME_VARIABLES,
    draw_probes,
    flow_drift,
    nll,
    value_and_divergence,
)
from stcli.components.loading import load_model
from stcli.components.nets import build_score_model
from stcli.components.recipe import load_recipe
from stcli.infra.console import info


def scipy_nll(score_fn, sde, x, vs, eps, rtol, atol):
    """The score_sde-style solve: one RK45 solve of the flattened (x, delta) state."""
    shape, n, device = x.shape, x.shape[0], x.device
    nfe = 0

    def rhs(t, y):
        nonlocal nfe
        nfe += 1
        xt = torch.from_numpy(y[: -n]).reshape(shape).to(device, x.dtype)
        tt = torch.full((n,), t, device=device, dtype=x.dtype)
        drift, div = value_and_divergence(lambda z: flow_drift(score_fn, sde, z, tt), xt,
                                          "rademacher", vs)
        return np.concatenate([drift.flatten().cpu().double().numpy(), div.cpu().double().numpy()])

    y0 = np.concatenate([x.flatten().cpu().double().numpy(), np.zeros(n)])
    sol = solve_ivp(rhs, (eps, sde.T), y0, rtol=rtol, atol=atol, method="RK45")
    x_T = torch.from_numpy(sol.y[: -n, -1]).reshape(shape).to(device, x.dtype)
    delta = torch.from_numpy(sol.y[-n:, -1]).to(device, x.dtype)
    return -(sde.prior_logp(x_T) + delta), nfe


def load(ckpt: str | None, device: str):
    if ckpt:
        loaded = load_model(ckpt, device=device)
        return Path(ckpt).parent.name, loaded.recipe, loaded.model
    recipe = load_recipe("recipes/quickstart_digits.yaml")
    torch.manual_seed(0)
    model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                              recipe.data.zero_centered).to(device).eval()
    return "random unet", recipe, model


def timed(fn, device: str):
    t0 = time.perf_counter()
    val, nfe = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return val, nfe, time.perf_counter() - t0


def bench_model(ckpt, args, label=None, configs=None) -> list[dict]:
    """Rows of every solver setting (`configs`: (variable, tol, norm) triples, else the
    command line's grid) on one batch of `args.batch` test points of `ckpt`."""
    name, recipe, model = load(ckpt, args.device)
    name = label or name
    data = recipe.data.for_evaluation()
    dataset = data.create("test")
    raw = torch.stack([dataset[i] for i in range(min(args.batch, len(dataset)))]).to(args.device)
    x = data.transform(raw, torch.Generator(args.device).manual_seed(0))
    sde, eps, dim = recipe.sde, recipe.truncation.eps, data.dim
    to_bits = 1 / (dim * math.log(2))
    vs = draw_probes(x.shape, "rademacher", 1, torch.Generator(args.device).manual_seed(1),
                     x.device, x.dtype)

    def ours(variable, tol, norm="rms", logp_tol=None):
        return lambda: nll(model.score, sde, x, eps=eps, correction="before", rtol=tol, atol=tol,
                           time_variable=variable, error_norm=norm, logp_tol=logp_tol,
                           generator=torch.Generator(args.device).manual_seed(1))

    cache = Path(args.cache) / f"ref_{name.replace(' ', '_')}_{len(x)}_{args.ref_tol:g}.pt" \
        if args.cache else None
    if cache and cache.exists():
        ref, ref_nfe, ref_s = torch.load(cache, weights_only=True).values()
    else:
        ref, ref_nfe, ref_s = timed(ours("t", args.ref_tol), args.device)
        if cache:
            torch.save({"ref": ref, "nfe": ref_nfe, "s": ref_s}, cache)
    scipy_cache = cache.with_name(cache.name.replace("ref_", "scipy_")) if cache else None
    if scipy_cache and scipy_cache.exists():
        base, base_nfe, base_s = torch.load(scipy_cache, weights_only=True).values()
    else:
        base, base_nfe, base_s = timed(lambda: scipy_nll(model.score, sde, x, vs, eps, 1e-5, 1e-5),
                                       args.device)
        if scipy_cache:
            torch.save({"val": base, "nfe": base_nfe, "s": base_s}, scipy_cache)
    info(f"{name}: d = {dim}, batch {len(x)}, reference dopri5 t {args.ref_tol:g}: {ref_nfe} NFE, "
         f"{ref_s:.1f} s, NLL {float(ref.mean() * to_bits):.4f} bits/dim (before the 8-bit offset)")

    def row(method, variable, tol, val, nfe, sec, norm="rms", logp_tol=None):
        return {"model": name, "dim": dim, "method": method, "variable": variable, "tol": tol,
                "norm": norm, "logp_tol": logp_tol,
                "nfe": nfe, "dnll_bpd": float((val - ref).abs().max() * to_bits),
                "dmean_bpd": float((val - ref).mean().abs() * to_bits),
                "dmean_se_bpd": float((val - ref).std() / math.sqrt(len(val)) * to_bits), "n": len(val),
                "seconds": sec,
                "nfe_ratio": base_nfe / nfe, "time_ratio": base_s / sec,
                "default": method == "st dopri5" and variable == DEFAULT["time_variable"]
                and tol == DEFAULT["rtol"] == DEFAULT["atol"] and norm == DEFAULT["error_norm"]
                and logp_tol is None}

    rows = [row("scipy RK45", "t", 1e-5, base, base_nfe, base_s)]
    if configs:
        configs = [(v, tol, n, None) for v, tol, n in configs]
    elif args.quick:
        configs = [("t", 1e-5, "rms", None),
                   (DEFAULT["time_variable"], DEFAULT["rtol"], DEFAULT["error_norm"], None)]
    else:
        configs = [(v, tol, n, lt) for n in args.norms for v in args.variables for tol in args.tols
                   for lt in (args.logp_tols if n == "max" else [None])]
    for variable, tol, norm, logp_tol in dict.fromkeys(configs):  # --quick: the default may be the paper's
        val, nfe, sec = timed(ours(variable, tol, norm, logp_tol), args.device)
        rows.append(row("st dopri5", variable, tol, val, nfe, sec, norm, logp_tol))
        info(table(rows[-1:]).splitlines()[-1])
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | d | solver | variable | error norm | rtol = atol | log p atol bits/dim | NFE "
             "| max abs dNLL bits/dim "
             "| abs dNLL of the mean | wall s "
             "| NFE ratio vs RK45 | time ratio vs RK45 |", "|---" * 13 + "|"]
    for r in rows:
        mark = " (default)" if r["default"] else ""
        lines.append(f"| {r['model']} | {r['dim']} | {r['method']}{mark} | {r['variable']} | {r['norm']} | "
                     f"{r['tol']:g} | {'-' if r['logp_tol'] is None else format(r['logp_tol'], 'g')} "
                     f"| {r['nfe']} | {r['dnll_bpd']:.5f} | {r['dmean_bpd']:.5f} | "
                     f"{r['seconds']:.2f} | "
                     f"{r['nfe_ratio']:.1f}x | {r['time_ratio']:.1f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter

    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = dict(zip(TIME_VARIABLES, ("C0", "C1", "C2")))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == m]
        styles = {"rms": "o-", "rms_per_part": "s--", "max": "^:"}
        for v in TIME_VARIABLES:
            for n in styles:
                pts = sorted((r["nfe"], max(r["dmean_bpd"], 1e-6)) for r in mine
                             if r["method"] == "st dopri5" and (r["variable"], r["norm"]) == (v, n))
                if pts:
                    ax.plot(*zip(*pts), styles[n], color=colors[v], label=f"dopri5, {v}, {n}")
        for r in mine:
            if r["method"] == "scipy RK45":
                ax.plot([r["nfe"]], [max(r["dmean_bpd"], 1e-6)], "k*", ms=10, label="scipy RK45 1e-5, t")
                ax.axvline(r["nfe"] / 5, color="grey", ls=":", label="1/5 of RK45's NFE")
        ax.axhline(goal, color="red", ls="--", lw=0.8, label=f"{goal} bits/dim")
        ax.set(xscale="log", yscale="log", xlabel="NFE", title=m)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.set_ylabel("|dNLL| of the batch mean, bits/dim")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", action="append", help="Checkpoint (repeatable).")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tols", type=float, nargs="+", default=[1e-2, 3e-3, 1e-3, 1e-4])
    p.add_argument("--variables", nargs="+", default=list(TIME_VARIABLES), choices=TIME_VARIABLES)
    p.add_argument("--norms", nargs="+", default=list(ERROR_NORMS), choices=(*ERROR_NORMS, "max"),
                   help="max: stcli.infra.solvers.max_norm, with --logp-tols (a library option, measured "
                        "here).")
    p.add_argument("--logp-tols", type=float, nargs="+", default=[1e-3],
                   help="With --norms max: the log-density's absolute tolerances, bits/dim.")
    p.add_argument("--name", action="append", help="Display name per --ckpt (default: its folder).")
    p.add_argument("--ref-tol", type=float, default=3e-7)
    p.add_argument("--quick", action="store_true", help="Only scipy, the paper's setting and the default.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", help="Write the error-vs-NFE plot here.")
    p.add_argument("--json", help="Write the rows here.")
    p.add_argument("--cache", help="Folder to keep (and reuse) the reference and scipy solutions in.")
    p.add_argument("--rows", nargs="+", help="Solve nothing: table and plot of these --json files' rows.")
    args = p.parse_args()
    rows = []
    for path in args.rows or []:
        rows += [r | {"logp_tol": r.get("logp_tol")} for r in json.loads(Path(path).read_text())]
    key = ("model", "method", "variable", "tol", "norm", "logp_tol")
    rows = list({tuple(r[k] for k in key): r for r in rows}.values())  # one row per setting
    rows.sort(key=lambda r: (r["model"], r["method"] != "scipy RK45", r["norm"], r["variable"], -r["tol"],
                             -(r["logp_tol"] or 0)))
    for i, ckpt in enumerate([] if args.rows else args.ckpt or [None]):
        rows += bench_model(ckpt, args, args.name[i] if args.name else None)
    info(f"device {args.device}, threads {torch.get_num_threads()}, batch {args.batch}\n" + table(rows))
    if args.plot:
        plot(rows, args.plot, 0.005)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    assert all(math.isfinite(r["dnll_bpd"]) for r in rows)


if __name__ == "__main__":
    main()
