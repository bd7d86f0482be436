"""`st import` / `st export` at the published size: time and file sizes, as a Markdown table.

A score_sde-format checkpoint of the recipe's net (random weights written in the official
layout: ``module.all_modules.N.*``, EMA shadows, an Adam state of the same size as score_sde
saves) is synthesised in a temporary folder, imported, exported as fp32 and fp16, and compared
with the size of an st training checkpoint of the same net (model, EMA, two Adam moments).

    python benchmarks/importer.py [--recipe recipes/cifar10_ncsnpp_ve_var.yaml] [KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stcli.components.recipe import load_recipe
from stcli.infra.console import info
from stcli.jobs import importer
from stcli.jobs.export import export


def official_file(recipe, path: Path) -> int:
    """Write a score_sde-format checkpoint of the recipe's net to path; its parameter count."""
    rows, _ = importer.plan(recipe)
    state = importer._build(recipe).state_dict()
    model = {}
    for row in rows:
        model.update(zip(row.official, row.invert(state[row.st])))
    fixed = {n for r in rows if r.st.endswith("fourier.W") for n in r.official}
    shadow = [v.clone() for k, v in model.items() if k not in fixed]
    adam = {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(v),
                "exp_avg_sq": torch.zeros_like(v)} for i, v in enumerate(shadow)}
    torch.save({"model": {f"module.{k}": v for k, v in model.items()},
                "ema": {"decay": 0.999, "num_updates": 1, "shadow_params": shadow},
                "optimizer": {"state": adam, "param_groups": [{"params": list(adam)}]},
                "step": 1}, path)
    return sum(v.numel() for v in shadow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/cifar10_ncsnpp_ve_var.yaml")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = official_file(recipe, tmp / "checkpoint.pth")
        t0 = time.perf_counter()
        importer.import_checkpoint(tmp / "checkpoint.pth", recipe, tmp / "imported.safetensors")
        seconds = time.perf_counter() - t0
        sizes = {"score_sde checkpoint (.pth)": (tmp / "checkpoint.pth").stat().st_size,
                 "st import (model + EMA)": (tmp / "imported.safetensors").stat().st_size}
        for dtype in ("fp32", "fp16"):
            out = tmp / f"export_{dtype}.safetensors"
            export(tmp / "imported.safetensors", out, "ema", dtype)
            sizes[f"st export --dtype {dtype}"] = out.stat().st_size
    training = 16 * n  # model, EMA, Adam's two moments in float32
    info(f"{recipe.net.name}: {n:,} parameters; st import took {seconds:.1f} s\n")
    info("| file | MiB | vs st training checkpoint |\n|---|---|---|")
    info(f"| st training checkpoint (16 B/parameter) | {training / 2**20:.1f} | 1.00 |")
    for name, size in sizes.items():
        info(f"| {name} | {size / 2**20:.1f} | {size / training:.2f} |")


if __name__ == "__main__":
    main()
