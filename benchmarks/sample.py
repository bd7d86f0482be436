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

from stcli.console import info
from stcli.recipe import load_recipe
from stcli.registry import SAMPLERS
from stcli.samplers.base import randn_like

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


ACCURACY = [("euler", "edm", 1), ("heun", "edm", 2), ("dpm2m", "edm", 1), ("dpm2m", "log_snr", 1)]


def accuracy(args) -> None:
    from stcli.loading import load_model

    device = torch.device(args.device)
    loaded = load_model(args.ckpt, device=args.device)
    model, sde, shape = loaded.model, loaded.recipe.sde, loaded.recipe.data.shape
    x = sde.prior_sample((args.batch, *shape), generator=torch.Generator(device).manual_seed(0),
                         device=device, dtype=torch.float32)
    ref_sampler = SAMPLERS.validate("ode", rtol=args.ref_tol, atol=args.ref_tol, denoise=False)
    ref, ref_nfe = ref_sampler(model.score, sde, x)
    info(f"{args.ckpt}: batch {args.batch}, reference dopri5 at {args.ref_tol:g}: {ref_nfe} NFE "
         "(per-sample steps)")
    rows = []
    for name, schedule, per_step in ACCURACY:
        for nfe in args.nfe:
            sampler = SAMPLERS.validate(name, steps=max(2, nfe // per_step), schedule=schedule,
                                        denoise=False)
            y, used = sampler(model.score, sde, x)
            rmse = float((y - ref).pow(2).mean().sqrt())
            rows.append({"sampler": name, "schedule": schedule, "nfe": used, "rmse": rmse})
    info("| sampler | schedule | NFE | RMSE to converged flow |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['sampler']} | {r['schedule']} | {r['nfe']} | {r['rmse']:.5f} |" for r in rows))
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        for name, schedule, _ in ACCURACY:
            pts = [(r["nfe"], r["rmse"]) for r in rows if (r["sampler"], r["schedule"]) == (name, schedule)]
            ax.plot(*zip(*pts), "o-", label=f"{name} ({schedule})")
        ax.set(xscale="log", yscale="log", xlabel="NFE", ylabel="RMSE to converged flow",
               title="probability-flow samplers, quickstart digits")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    if args.json:
        import json

        open(args.json, "w").write(json.dumps(rows, indent=1))


def fid_per_nfe(args) -> None:
    """The small-scale FID of benchmarks/repro (64-d features of a digit classifier trained on
    the digits train split, against that split) of --fid samples per sampler and NFE, all from
    the same prior draw, with the final denoising step."""
    import sys
    import tempfile
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "repro"))
    import digits_fid as dfid

    from stcli.loading import load_model

    device = torch.device(args.device)
    loaded = load_model(args.ckpt, device=args.device)
    model, recipe = loaded.model, loaded.recipe
    sde, shape = recipe.sde, recipe.data.shape
    with tempfile.TemporaryDirectory() as tmp:
        acc = dfid.train_classifier(Path(tmp) / "cnn.safetensors")
        ext = dfid.extractor(Path(tmp) / "cnn.safetensors")
        ref = dfid.features(dfid.digit_split("train")[0], ext)
    x = sde.prior_sample((args.fid, *shape), generator=torch.Generator(device).manual_seed(0),
                         device=device, dtype=torch.float32)
    info(f"{args.ckpt}: FID of {args.fid} samples against the digits train split (classifier "
         f"test accuracy {acc['test_accuracy']:.3f})")
    test = dfid.digit_split("test")[0][:args.fid]  # the floor: real digits not in the reference
    rows = [{"sampler": f"digits test split ({len(test)} images)", "schedule": "-", "nfe": 0,
             "fid": dfid.fid(dfid.features(test, ext), ref)}]
    for name, schedule, per_step in ACCURACY:
        for nfe in args.nfe:
            sampler = SAMPLERS.validate(name, steps=max(2, nfe // per_step), schedule=schedule)
            y, used = sampler(model.score, sde, x)
            feats = dfid.features(recipe.data.picture(y).cpu(), ext)
            rows.append({"sampler": name, "schedule": schedule, "nfe": used, "fid": dfid.fid(feats, ref)})
            info(f"| {name} | {schedule} | {used} | {rows[-1]['fid']:.2f} |")
    info("| sampler | schedule | NFE | FID |\n|---|---|---|---|\n" + "\n".join(
        f"| {r['sampler']} | {r['schedule']} | {r['nfe']} | {r['fid']:.2f} |" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="+", help="name:steps pairs instead of the default set")
    parser.add_argument("--ckpt", help="measure accuracy vs NFE on this checkpoint")
    parser.add_argument("--nfe", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--ref-tol", type=float, default=1e-7)
    parser.add_argument("--fid", type=int, help="With --ckpt (digits): FID of N samples per NFE instead.")
    parser.add_argument("--plot")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ckpt and args.fid:
        return fid_per_nfe(args)
    if args.ckpt:
        return accuracy(args)
    device = torch.device(args.device)
    recipe = load_recipe("recipes/quickstart_digits.yaml")
    torch.manual_seed(0)
    from stcli.nets import build_score_model

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
