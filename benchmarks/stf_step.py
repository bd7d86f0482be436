"""Cost of Stable Target Field per training step, and of loading its reference batches.

    python benchmarks/stf_step.py [RECIPE] [--n 256 1024] [--steps 40] [--reps 3]

1. Training: the recipe (default quickstart_digits) trained for `warm + steps` steps with the
   ordinary target and with `loss.target={name: stf, reference_batch: n}`, variants interleaved
   `reps` times; time per step from log.jsonl after the warm-up (data loading included), the
   fastest rep of each (robust to other load on a shared machine), and the ratio to plain DSM
   measured in the same run.
2. Loading: reference images per second of the reference loader alone (the DataLoader train.py
   uses) for the recipe's in-memory data and for a folder of 32x32 PNG files, 0 and 2 workers,
   against the images per second one training step consumes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stcli.components.recipe import load_recipe
from stcli.components.stf import ReferenceBatches
from stcli.infra.distributed import Context
from stcli.jobs.train import StepBatches, Trainer, make_loader


def step_time(recipe_path, overrides, warm, steps, out) -> float:
    """Seconds per step over `steps` steps after `warm` (from the run's own log)."""
    recipe = load_recipe(recipe_path, [*overrides, f"train.steps={warm + steps}",
                                       f"train.log_every={warm}", "train.sample_every=0",
                                       "train.ckpt_every=1000000", f"train.out_dir={out}",
                                       "train.device=cpu"])
    Trainer(recipe, Context(0, 1, torch.device("cpu"))).run()
    log = [json.loads(line) for line in (Path(out) / "log.jsonl").open()]
    elapsed = {r["step"]: r["elapsed_s"] for r in log}
    return (elapsed[warm + steps] - elapsed[warm]) / steps


def png_folder(root: Path, count: int) -> Path:
    root.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(g.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def loader_rate(recipe, extra: int, workers: int, steps: int) -> float:
    """Reference images per second delivered by the reference loader of train.py."""
    dataset, cpu = recipe.data.create("train"), torch.device("cpu")
    batches = StepBatches(len(dataset), recipe.train.batch_size, Context(0, 1, cpu), 0, 0)
    it = iter(make_loader(dataset, ReferenceBatches(batches, extra, gather=False), workers, cpu))
    next(it)  # start-up of the workers is not counted
    t0 = time.perf_counter()
    for _ in range(steps):
        next(it)
    return extra * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe", nargs="?", default="recipes/quickstart_digits.yaml")
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warm", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    variants = {"dsm": []} | {f"stf n={n}": [f"loss.target={{name: stf, reference_batch: {n}}}"]
                              for n in args.n}
    times = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for name, overrides in variants.items():
                out = Path(tmp) / f"{name.replace(' ', '_').replace('=', '')}-{rep}"
                times[name].append(step_time(args.recipe, overrides, args.warm, args.steps, out))
        base = min(times["dsm"])
        print(f"\n{recipe.name}: batch {recipe.train.batch_size}, {args.steps} steps x {args.reps}"
              f" reps, {torch.get_num_threads()} threads")
        print(f"{'target':<12} {'ms/step':>9} {'ratio to DSM':>13}")
        for name, ts in times.items():
            m = min(ts)
            print(f"{name:<12} {1000 * m:9.1f} {m / base:12.2f}x")

        consumed = recipe.train.batch_size / base
        print(f"\nreference loader (extra images beyond the batch), images/s; one DSM step "
              f"consumes {consumed:.0f} batch images/s")
        folder = png_folder(Path(tmp) / "png", 2048)
        sources = {recipe.data.name: recipe,
                   "png folder 32x32": load_recipe(args.recipe, [
                       f"data={{name: folder, root: {folder}, image_size: 32}}",
                       "net.ch_mult=[1, 2, 2]"])}
        print(f"{'data':<18} {'extra':>6} {'workers':>8} {'images/s':>10} {'ms/step':>9}")
        for label, r in sources.items():
            for n in args.n:
                extra = n - r.train.batch_size
                for workers in (0, 2):
                    rate = loader_rate(r, extra, workers, steps=10)
                    print(f"{label:<18} {extra:6d} {workers:8d} {rate:10.0f} "
                          f"{1000 * extra / rate:9.1f}")


if __name__ == "__main__":
    main()
