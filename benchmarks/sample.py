"""Images/s and NFE of each sampler on a small net (a freshly built 16x16 `unet`, the
quickstart's), as a Markdown table with the speed relative to a baseline run in the same
process (euler_maruyama, the recipes' default).

    python benchmarks/sample.py [--batch 16] [--steps 50] [--threads 2] [--repeat 3] [--device cpu]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    recipe = load_recipe("recipes/quickstart_digits.yaml")
    torch.manual_seed(0)
    from stcli.nets import build_score_model

    model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                              getattr(recipe.data, "centered", True)).to(device).eval()
    info(f"net: unet {recipe.data.shape} ({sum(p.numel() for p in model.parameters()):,} "
         f"parameters), batch {args.batch}, {args.threads} threads, {device}")
    info("| sampler | settings | NFE | images/s | vs euler_maruyama |\n|---|---|---|---|---|")
    base = None
    for name, params in cases(args.steps):
        sampler, nfe, rate = measure(model, recipe.sde, name, params, args.steps, args.batch,
                                     recipe.data.shape, device, args.repeat)
        base = base or rate
        shown = ("steps", "schedule", *params)
        settings = ", ".join(f"{k}={v}" for k, v in sampler.model_dump().items() if k in shown)
        info(f"| {name} | {settings} | {nfe} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
