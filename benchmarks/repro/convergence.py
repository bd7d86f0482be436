"""The convergence study behind the reproduction's budgets: measure the EMA snapshots
ckpt-<step>.safetensors of one long run of L(θ; g², ε) (test NLL, NELBO and sample quality with
the reproduction's evaluation settings, `evaluate.measure`), plot them against the step, and
find the first snapshot after which nothing improves by more than 2 standard errors.

    python benchmarks/repro/convergence.py digits RUN_DIR     # FID (digit CNN), Heun 35 NFE
    python benchmarks/repro/convergence.py toy2d RUN_DIR      # MMD² (h = 0.1)

Measured snapshots are kept in benchmarks/repro/results/convergence_<data>.json (a rerun measures
only new ones); the figure goes to docs/img/repro_convergence_<data>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from variants import DATASETS, ROOT  # noqa: E402

QUALITY = {"digits": ("fid", "FID (digit CNN)"), "toy2d": ("mmd2_h0.1", "MMD² h = 0.1")}


def snapshots(run_dir: Path) -> list[tuple[int, Path]]:
    found = (re.fullmatch(r"ckpt-(\d+)\.safetensors", p.name) for p in run_dir.iterdir())
    return sorted((int(m[1]), run_dir / m[0]) for m in found if m)


def measure_all(data_key: str, run_dir: Path, path: Path, classifier: Path | None,
                only: set[int] | None = None) -> list[dict]:
    """Every snapshot (of the steps `only`, if given) not yet in `path`, measured and appended
    (the file is rewritten after each)."""
    from evaluate import measure

    data = DATASETS[data_key]
    points = json.loads(path.read_text())["points"] if path.is_file() else []
    done = {p["step"] for p in points}
    for step, ckpt in snapshots(run_dir):
        if step in done or (only and step not in only):
            continue
        point = measure(ckpt, data, data.full, ROOT / "runs" / "convergence" / data_key / f"samples-{step}",
                        classifier) | {"step": step}
        points = sorted([*points, point], key=lambda p: p["step"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"data": data_key, "run": str(run_dir), "points": points}, indent=1))
        key = QUALITY[data_key][0]
        print(f"step {step}: NLL {point['nll']['mean']:.4f} NELBO {point['nelbo']['mean']:.4f} "
              f"{key} {point[key]:.4g} ± {point[key + '_se']:.2g} ({point['measure_s']:.0f} s)", flush=True)
    return points


def paired_se(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of b - a over the same test items (the same noise)."""
    d = np.asarray(b) - np.asarray(a)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def converged_at(points: list[dict], key: str, tol: str = "item", later: int = 2,
                 window: float = 1.0, delta: float = 0.0) -> dict:
    """The first snapshot s, followed by at least `later` snapshots and by one at `window` x s
    or beyond, that no later snapshot beats.  s' beats s if the sample-quality score of s' is
    lower by more than 2 s.e. of the difference (independent samples: sqrt(se_s^2 + se_s'^2)),
    or if the NELBO of s' is lower by more than
      tol="item":       the standard error of NELBO(s) over test items (the tables' resolution);
      tol="paired":     2 s.e. of the paired difference over the same items and noise (any
                        detectable improvement);
      tol="resolution": both `delta` bits/dim and 2 paired s.e. (a detectable improvement of a
                        size that matters); and s' also beats s if its NLL (the same test
                        items, dequantisation noise and probes) is lower by more than `delta`.
    step None: no snapshot qualifies yet."""
    last = points[-1]["step"] if points else None
    for i, p in enumerate(points[: max(len(points) - later, 0)]):
        if last < window * p["step"]:
            break
        beaten = False
        for q in points[i + 1:]:
            dn, sn = paired_se(p["nelbo_items"], q["nelbo_items"])
            allowed = {"item": p["nelbo"]["stderr"], "paired": 2 * sn,
                       "resolution": max(delta, 2 * sn)}[tol]
            sq = math.hypot(p[key + "_se"], q[key + "_se"])
            beaten |= dn < -allowed or q[key] - p[key] < -2 * sq
            if tol == "resolution":
                beaten |= q["nll"]["mean"] - p["nll"]["mean"] < -delta
        if not beaten:
            return {"step": p["step"], "tol": tol, "later": later, "window": window, "delta": delta,
                    "last": last}
    return {"step": None, "tol": tol, "later": later, "window": window, "delta": delta, "last": last}


def markdown(points: list[dict], key: str, scale: float = 1.0) -> str:
    """One row per snapshot: NLL, NELBO (± s.e. over test items), the paired change of the
    NELBO since the previous snapshot, and the sample-quality score ± its s.e."""
    label = QUALITY["digits" if key == "fid" else "toy2d"][1] + (" (×10³)" if scale != 1 else "")
    lines = [f"| step | NLL (bpd) | NELBO (bpd) | Δ NELBO since previous (paired) | {label} |",
             "|---|---|---|---|---|"]
    for prev, p in zip([None, *points], points):
        d = "–" if prev is None else "{:+.4f} ± {:.4f}".format(*paired_se(prev["nelbo_items"],
                                                                         p["nelbo_items"]))
        lines.append(f"| {p['step']:,} | {p['nll']['mean']:.3f} ± {p['nll']['stderr']:.3f} | "
                     f"{p['nelbo']['mean']:.3f} ± {p['nelbo']['stderr']:.3f} | {d} | "
                     f"{p[key] * scale:.2f} ± {p[key + '_se'] * scale:.2f} |")
    return "\n".join(lines)


def plot(points: list[dict], data_key: str, path: Path, verdict: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = QUALITY[data_key]
    steps = [p["step"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for name, color in (("nll", "tab:blue"), ("nelbo", "tab:orange")):
        axes[0].errorbar(steps, [p[name]["mean"] for p in points], [p[name]["stderr"] for p in points],
                         fmt="o-", ms=3, capsize=2, color=color, label=name.upper())
    axes[1].errorbar(steps, [p[key] for p in points], [p[key + "_se"] for p in points],
                     fmt="o-", ms=3, capsize=2, color="tab:green")
    for ax in axes:
        if verdict["step"] is not None:
            ax.axvline(verdict["step"], color="k", ls=":", lw=1)
        ax.set_xlabel("training step")
    axes[0].set(ylabel="bits/dim (test)", title=f"{data_key}: L(θ; g², ε), EMA snapshots")
    axes[0].legend()
    axes[1].set(ylabel=label + ("" if data_key == "digits" else ""), title="sample quality, Heun 35 NFE")
    if data_key == "toy2d":
        axes[1].set_yscale("log")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data", choices=sorted(QUALITY))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="default benchmarks/repro/results/convergence_<data>.json")
    p.add_argument("--img", type=Path, help="default docs/img/repro_convergence_<data>.png")
    p.add_argument("--steps", type=int, nargs="+", help="measure only these snapshots")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = args.out or HERE / "results" / f"convergence_{args.data}.json"
    classifier = None
    if args.data == "digits":
        import run

        classifier = run.prepare_classifier(ROOT / "runs" / "repro", {})
    points = measure_all(args.data, args.run_dir, out, classifier,
                         set(args.steps) if args.steps else None)
    verdict = converged_at(points, QUALITY[args.data][0])
    verdict["paired"] = converged_at(points, QUALITY[args.data][0], tol="paired")["step"]
    plot(points, args.data, args.img or ROOT / "docs" / "img" / f"repro_convergence_{args.data}.png", verdict)
    print(markdown(points, QUALITY[args.data][0], 1.0 if args.data == "digits" else 1e3))
    print(f"converged at: {verdict}")
    return verdict


if __name__ == "__main__":
    main()
