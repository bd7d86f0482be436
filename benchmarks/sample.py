"""Images/s and NFE of each sampler on a small net (a freshly built 16x16 `unet`, the
quickstart's), as a Markdown table with the speed relative to a baseline run in the same
process (euler_maruyama, the recipes' default).

    python benchmarks/sample.py [--batch 16] [--steps 50] [--threads 2] [--repeat 3] [--device cpu]
    python benchmarks/sample.py --cases heun:35 euler_maruyama:1000 --batch 1000 --device cuda

With --ckpt, the accuracy of the probability-flow samplers instead: from the same prior draw,
the RMSE of each sampler's x_eps (no denoising step) to a converged probability-flow solution
(adaptive dopri5 at --ref-tol), at each of --nfe evaluations (euler and dpm2m: steps = NFE;
heun: steps = NFE/2), and an error-vs-NFE plot with --plot:

    python benchmarks/sample.py --ckpt runs/q/ckpt.safetensors --batch 16 --plot docs/img/sample_rmse_nfe.png

With --ckpt and --fid N (a digits checkpoint), the small-scale FID of benchmarks/repro per
sampler and NFE instead, from N samples:

    python benchmarks/sample.py --ckpt runs/q/ckpt.safetensors --fid 500 --nfe 10 20 50

Random weights make the adaptive ODE's NFE a property of an untrained field, so read its row
as a cost example, not as the NFE of a trained model.
"""

from __future__ import annotations

import argparse
import time

import torch
from machine import machine

from stcli.components.recipe import load_recipe
from stcli.components.samplers.base import randn_like
from stcli.infra.console import info
from stcli.infra.registry import SAMPLERS

BASELINE = ("euler_maruyama", {})


def cases(steps: int) -> list[tuple[str, dict]]:
    return [BASELINE,
            ("pc", {"predictor": "reverse_diffusion", "corrector": "langevin"}),
            ("pc", {"predictor": "ancestral", "corrector": "none"}),
            ("ode", {"rtol": 1e-3, "atol": 1e-3}),
            ("ode", {"rtol": 1e-5, "atol": 1e-5}),
            ("euler", {}),
            ("heun", {"steps": max(1, steps // 2)})]


def measure(model, sde, name: str, params: dict, steps: int, batch: int, shape, device,
            repeat: int) -> tuple:
    params = ({"steps": steps} if "steps" in SAMPLERS.spec(name).model_fields else {}) | params
    sampler = SAMPLERS.validate(name, **params)
    gens = [torch.Generator(device=device).manual_seed(i) for i in range(batch)]
    x = randn_like(torch.empty(batch, *shape, device=device), gens)
    best = float("inf")
    for _ in range(repeat):  # the best of `repeat` runs: the machine may be shared
        start = time.perf_counter()
        _, nfe = sampler(model.score, sde, x, generator=gens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return sampler, nfe, batch / best


GRIDS = ("uniform", "log_snr", "edm")
# the probability-flow samplers on every grid, and the two multistep ones on their grid tuned
# per model and NFE by st tune-steps (on draws of its own)
ACCURACY = [f"{name}:{grid}" for name in ("euler", "heun", "dpm2m", "unipc") for grid in GRIDS] + [
    "dpm2m:tuned", "unipc:tuned"]


def parse_case(text: str) -> tuple[str, dict]:
    """'name:schedule[:key=value,...]' (values read as YAML) -> (name, settings)."""
    from stcli.components.recipe import safe_load

    name, schedule, *rest = text.split(":")
    params = dict(item.split("=", 1) for item in rest[0].split(",")) if rest else {}
    return name, {"schedule": schedule} | {k: safe_load(v) for k, v in params.items()}


def steps_for(name: str, nfe: int) -> int:
    """Grid steps that spend `nfe` evaluations: heun takes 2 per step, the others 1."""
    return max(2, nfe // (2 if name == "heun" else 1))


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, (var / n) ** 0.5


def prior_draw(sde, n: int, shape, seed: int, device) -> torch.Tensor:
    """x_T of `n` samples from a generator seeded with `seed`: one noise draw per seed."""
    return sde.prior_sample((n, *shape), generator=torch.Generator(device).manual_seed(seed),
                            device=device, dtype=torch.float32)


def reference(model, sde, x: torch.Tensor, tol: float, cache: str | None, key: str):
    """The converged probability flow from x (adaptive dopri5 at rtol = atol = tol, no
    denoising) and its NFE, read from / written to `cache` (a folder) when given."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    path = Path(cache) / f"{key}.safetensors" if cache else None
    if path and path.exists():
        saved = load_file(str(path))
        if torch.equal(saved["x_T"], x.cpu()):
            return saved["ref"].to(x.device), int(saved["nfe"])
    ref, nfe = SAMPLERS.validate("ode", rtol=tol, atol=tol, denoise=False)(model.score, sde, x)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x_T": x.cpu(), "ref": ref.cpu(), "nfe": torch.tensor(nfe)}, str(path))
    return ref, nfe


def accuracy(args) -> None:
    """RMSE of x_eps to the converged flow per case and NFE, mean ± s.e. over the seeds."""
    import hashlib

    from stcli.components.loading import load_model

    device = torch.device(args.device)
    loaded = load_model(args.ckpt, device=args.device)
    model, sde, shape = loaded.model, loaded.recipe.sde, loaded.recipe.data.shape
    sha = hashlib.sha256(open(args.ckpt, "rb").read()).hexdigest()
    todo = [(text, *parse_case(text)) for text in args.accuracy_cases]
    rmse = {(text, nfe): [] for text, _, _ in todo for nfe in args.nfe}
    used = {}
    ref_nfe = []
    tuned = {(text, nfe): tune(args, name, params, nfe) for text, name, params in todo
             for nfe in args.nfe if params.get("schedule") == "tuned"}
    for seed in args.seeds:
        x = prior_draw(sde, args.batch, shape, seed, device)
        ref, nfe_ref = reference(model, sde, x, args.ref_tol, args.ref_cache,
                                 f"{sha[:16]}-b{args.batch}-s{seed}-tol{args.ref_tol:g}")
        ref_nfe.append(nfe_ref)
        for text, name, params in todo:
            for nfe in args.nfe:
                sampler = case_sampler(name, params, nfe, tuned.get((text, nfe)), denoise=False)
                y, used[text, nfe] = sampler(model.score, sde, x)
                rmse[text, nfe].append(float((y - ref).pow(2).mean().sqrt()))
        info(f"seed {seed}: reference {nfe_ref} NFE; " + ", ".join(
            f"{text}@{nfe} {rmse[text, nfe][-1]:.4f}" for text, _, _ in todo for nfe in args.nfe))
    rows = [{"case": text, "sampler": name, "nfe": used[text, nfe],
             "settings": tuned[text, nfe]["sampler"] if (text, nfe) in tuned else params,
             "tuning": {k: v for k, v in tuned[text, nfe].items() if k != "sampler"}
             if (text, nfe) in tuned else None,
             "rmse": rmse[text, nfe], "mean": mean_se(rmse[text, nfe])[0],
             "se": mean_se(rmse[text, nfe])[1]} for text, name, params in todo for nfe in args.nfe]
    info(f"{args.ckpt}: {args.batch} samples per seed, seeds {args.seeds}, reference dopri5 at "
         f"{args.ref_tol:g} ({min(ref_nfe)}-{max(ref_nfe)} NFE); RMSE mean ± s.e. over the seeds")
    info(table(rows, args.nfe, lambda r: f"{r['mean']:.4f} ± {r['se']:.4f}"))
    result = {"ckpt": args.ckpt, "ckpt_sha256": sha, "step": loaded.step, "batch": args.batch,
              "seeds": args.seeds, "ref_tol": args.ref_tol, "ref_nfe": ref_nfe,
              "machine": machine(), "rows": rows}
    if args.json:
        import json

        open(args.json, "w").write(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot([result], args.plot)


def case_sampler(name: str, params: dict, nfe: int, tuned: dict | None, denoise: bool):
    """The sampler of a case at `nfe` evaluations: on its schedule, or on the grid tuned for
    this NFE (`tune`)."""
    grid = {k: v for k, v in (tuned["sampler"] if tuned else params).items() if k != "name"}
    return SAMPLERS.validate(name, **{"steps": steps_for(name, nfe), **grid, "denoise": denoise})


def tune(args, name: str, params: dict, nfe: int) -> dict:
    """`st tune-steps` on --tune-calib prior draws of its own (not the seeds measured), at
    --tune-ref-tol (unipc without an order: st tune-steps' choice of order)."""
    settings = {"name": name} | {k: v for k, v in params.items() if k != "schedule"}
    result = tune_one(args, settings, steps_for(name, nfe))
    info(f"tuned {name} at {nfe} NFE: order {result['sampler'].get('order', '-')}, {result['base']} "
         f"warped by {[round(c, 3) for c in result['warp']]} ({result['search_runs']} runs): "
         "calibration RMSE " + ", ".join(f"{r['grid']} {r['calib_rmse']:.4f}" for r in result["rows"]))
    return result


def tune_one(args, settings: dict, steps: int) -> dict:
    """One st tune-steps search, kept in --ref-cache (tune-*.json) when given."""
    import hashlib
    import json
    from pathlib import Path

    from stcli.infra.checkpoint import file_sha256
    from stcli.jobs.tune import TuneOptions, tune_steps

    opts = TuneOptions(sampler=settings, steps=steps, calib=args.tune_calib, check=0,
                       ref_tol=args.tune_ref_tol, device=args.device)
    # (the tag: entries made before unipc chose its order meant order 3 for no order)
    key = hashlib.sha256((file_sha256(args.ckpt) + repr(opts) + "orders chosen").encode()
                         ).hexdigest()[:16]
    path = Path(args.ref_cache) / f"tune-{key}.json" if args.ref_cache else None
    if path and path.is_file():
        return json.loads(path.read_text())
    result = tune_steps(args.ckpt, opts)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return result


def table(rows: list[dict], nfes: list[int], cell) -> str:
    """A Markdown table: one row per case, one column per NFE."""
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["nfe"] if "nfe_target" not in r else r["nfe_target"]): r for r in rows}
    lines = ["| sampler:grid | " + " | ".join(f"{n} NFE" for n in nfes) + " |",
             "|---|" + "---|" * len(nfes)]
    for case in cases:
        cells = [cell(by[case, n]) if (case, n) in by else "-" for n in nfes]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, titles: list[str] | None = None) -> None:
    """RMSE vs NFE with s.e. bars, one panel per result: each sampler at its best grid for each
    NFE (the lowest mean RMSE over its cases), the grid named at each point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def line_of(row: dict) -> str:  # a sampler on fixed schedules, or on its tuned grids
        return row["sampler"] + (" (tuned grid)" if ":tuned" in row["case"] else "")

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.9), squeeze=False)
    for ax, result, title in zip(axes[0], results, titles or [r["ckpt"] for r in results]):
        # a tuned grid at a fixed order is a diagnostic: the line is st tune-steps' own choice
        rows = [r for r in result["rows"] if ":tuned:" not in r["case"]]
        for name in dict.fromkeys(map(line_of, rows)):
            mine = [r for r in rows if line_of(r) == name]
            best = [min((r for r in mine if r["nfe"] == n), key=lambda r: r["mean"])
                    for n in sorted({r["nfe"] for r in mine})]
            line = ax.errorbar([r["nfe"] for r in best], [r["mean"] for r in best],
                               yerr=[r["se"] for r in best], fmt="o-", capsize=3, label=name)
            for r in best:
                ax.annotate(r["case"].split(":", 1)[1], (r["nfe"], r["mean"]), fontsize=6,
                            color=line[0].get_color(), xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMSE to converged flow",
               title=f"{title} ({len(result['seeds'])} seeds x {result['batch']})")
        ax.legend(fontsize=8, title="best grid per NFE", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fid_per_nfe(args) -> None:
    """The small-scale FID of benchmarks/repro (64-d features of the digit classifier of
    runs/repro/classifier, trained on the digits train split, against that split) of --fid
    samples per case and NFE (steps = NFE, then the denoising step), one prior draw per seed:
    FID ± its bootstrap s.e. per seed, and the mean ± s.e. over the seeds."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "repro"))
    import digits_fid as dfid

    from stcli.components.loading import load_model

    device = torch.device(args.device)
    loaded = load_model(args.ckpt, device=args.device)
    model, recipe = loaded.model, loaded.recipe
    sde, shape = recipe.sde, recipe.data.shape
    weights = Path(args.classifier)
    with tempfile.TemporaryDirectory() as tmp:
        if not weights.exists():  # as before: a classifier of its own, seeded
            weights = Path(tmp) / "cnn.safetensors"
            dfid.train_classifier(weights)
        ext = dfid.extractor(weights)
    ref = dfid.features(dfid.digit_split("train")[0], ext)
    test = dfid.digit_split("test")[0][:args.fid]  # the floor: real digits not in the reference
    test_feats = dfid.features(test, ext)
    floor = {"case": f"digits test split ({len(test)} images)", "fid": dfid.fid(test_feats, ref),
             "bootstrap_se": dfid.fid_bootstrap_se(test_feats, ref)}
    info(f"{args.ckpt}: FID of {args.fid} samples per seed against the digits train split; "
         f"floor {floor['fid']:.2f} ± {floor['bootstrap_se']:.2f}")
    todo = [(text, *parse_case(text)) for text in args.accuracy_cases]
    per = {(text, nfe): [] for text, _, _ in todo for nfe in args.nfe}
    used = {}
    tuned = {(text, nfe): tune(args, name, params, nfe) for text, name, params in todo
             for nfe in args.nfe if params.get("schedule") == "tuned"}
    for seed in args.seeds:
        x = prior_draw(sde, args.fid, shape, seed, device)
        for text, name, params in todo:
            for nfe in args.nfe:
                sampler = case_sampler(name, params, nfe, tuned.get((text, nfe)), denoise=True)
                y, used[text, nfe] = sampler(model.score, sde, x)
                feats = dfid.features(recipe.data.picture(y).cpu(), ext)
                per[text, nfe].append((dfid.fid(feats, ref), dfid.fid_bootstrap_se(feats, ref)))
                info(f"seed {seed} | {text} | {used[text, nfe]} NFE | FID {per[text, nfe][-1][0]:.2f} "
                     f"± {per[text, nfe][-1][1]:.2f}")
    rows = [{"case": text, "sampler": name, "settings": params, "nfe_target": nfe,
             "nfe": used[text, nfe], "fid": [f for f, _ in per[text, nfe]],
             "bootstrap_se": [s for _, s in per[text, nfe]],
             "mean": mean_se([f for f, _ in per[text, nfe]])[0],
             "se": mean_se([f for f, _ in per[text, nfe]])[1]} for text, name, params in todo
            for nfe in args.nfe]
    info(table(rows, args.nfe, lambda r: f"{r['mean']:.2f} ± {r['se']:.2f} ({r['nfe']} NFE)"))
    if args.json:
        import json

        result = {"ckpt": args.ckpt, "step": loaded.step, "classifier": str(args.classifier),
                  "samples_per_seed": args.fid, "seeds": args.seeds, "floor": floor,
                  "machine": machine(), "rows": rows}
        open(args.json, "w").write(json.dumps(result, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="+", help="name:steps pairs instead of the default set")
    parser.add_argument("--ckpt", help="measure accuracy vs NFE on this checkpoint")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                        help="One prior draw x_T per seed.")
    parser.add_argument("--accuracy-cases", nargs="+", default=ACCURACY,
                        help="name:schedule[:key=value,...] per case, e.g. unipc:edm:order=2,bh=h; "
                        "schedule `tuned`: the grid of st tune-steps, tuned per NFE")
    parser.add_argument("--ref-tol", type=float, default=1e-7)
    parser.add_argument("--tune-calib", type=int, default=64,
                        help="Prior draws a `tuned` case's grid is tuned on (st tune-steps).")
    parser.add_argument("--tune-ref-tol", type=float, default=1e-5,
                        help="Reference tolerance of the tuning (st tune-steps' default).")
    parser.add_argument("--ref-cache", help="A folder that keeps the reference solutions.")
    parser.add_argument("--fid", type=int, help="With --ckpt (digits): FID of N samples per NFE instead.")
    parser.add_argument("--classifier", default="runs/repro/classifier/digits_cnn.safetensors",
                        help="The digit classifier of --fid (trained afresh if missing).")
    parser.add_argument("--plot")
    parser.add_argument("--replot", nargs="+", help="Draw --plot from these JSON results instead.")
    parser.add_argument("--titles", nargs="+", help="Panel titles of --replot.")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.replot:
        import json

        return plot([json.load(open(p)) for p in args.replot], args.plot, args.titles)
    if args.ckpt and args.fid:
        return fid_per_nfe(args)
    if args.ckpt:
        return accuracy(args)
    device = torch.device(args.device)
    recipe = load_recipe("recipes/quickstart_digits.yaml")
    torch.manual_seed(0)
    from stcli.components.nets import build_score_model

    model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                              recipe.data.zero_centered).to(device).eval()
    info(f"net: unet {recipe.data.shape} ({sum(p.numel() for p in model.parameters()):,} "
         f"parameters), batch {args.batch}, {args.threads} threads, {device}")
    info("| sampler | settings | NFE | images/s | vs euler_maruyama |\n|---|---|---|---|---|")
    base = None
    todo = cases(args.steps) if not args.cases else [
        (c.split(":")[0], {"steps": int(c.split(":")[1])}) for c in args.cases]
    for name, params in todo:
        sampler, nfe, rate = measure(model, recipe.sde, name, params, args.steps, args.batch,
                                     recipe.data.shape, device, args.repeat)
        base = base or rate
        shown = ("steps", "schedule", *params)
        settings = ", ".join(f"{k}={v}" for k, v in sampler.model_dump().items() if k in shown)
        info(f"| {name} | {settings} | {nfe} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
