"""Training-batch throughput of the data path, beside the images/s of a training step.

    python benchmarks/loader.py [--batch 128] [--steps 200] [--reps 3] [--step-steps 20]

For in-memory data sets, images per second delivered to the step as its model input: batch
indices (StepBatches), the batch gathered, then flipped and dequantised by `transform` on the
device.  Two paths over the same data and indices: `dataloader` (a torch DataLoader over the
in-memory set, 0 workers, the batch copied to the device — the path before the data were held
on the device, still the path of file-backed data) and `device` (the set held on the device as
one tensor, `stcli.jobs.train.DeviceBatches`, what `st train` uses for in-memory data).  Data: a
CIFAR-10-shaped set (50,000 random uint8 3x32x32, flips and uniform dequantisation), the
digits (16x16) and the 2-D mixture (float32).  Repetitions are interleaved and the best kept
(robust to other load on a shared machine).  Then one training step of the quickstart recipe
(images/s from its own log), for scale.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from stf_step import step_time

from stcli.components.data import Cifar10, Digits, InMemory, Toy2D
from stcli.infra.distributed import Context
from stcli.infra.seeding import generator
from stcli.jobs.train import StepBatches, held_on_device, make_loader


class SyntheticCifar(Cifar10):
    """CIFAR-10's spec (flips, dequantisation, centring) over random uint8 images."""

    def load(self, split: str):
        g = torch.Generator().manual_seed(0)
        return InMemory(torch.randint(0, 256, (50_000, 3, 32, 32), dtype=torch.uint8, generator=g))


def rate(spec, dataset, path: str, batch: int, steps: int, device: torch.device) -> float:
    """Model inputs per second over `steps` batches (after one untimed batch)."""
    sampler = StepBatches(len(dataset), batch, Context(0, 1, device), seed=0, start=0)
    held = held_on_device(dataset, device) if path == "device" else None
    it = iter(make_loader(dataset, sampler, 0, device, held))
    spec.transform(next(it).to(device), generator(device, 0, "noise", 0, 0, 0))
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = spec.transform(next(it).to(device, non_blocking=True),
                           generator(device, 0, "noise", step, 0, 0))
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert x.dtype == torch.float32 and len(x) == batch
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-steps", type=int, default=20, help="Timed quickstart steps (0: skip).")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    specs = {"CIFAR-10-shaped 3x32x32": SyntheticCifar(random_flip=True, dequantization="uniform"),
             "digits 1x16x16": Digits(image_size=16, random_flip=True, dequantization="uniform"),
             "2-D mixture (float)": Toy2D(n=20_000)}
    sets = {name: spec.create("train") for name, spec in specs.items()}
    best = {}
    for _ in range(args.reps):
        for name, spec in specs.items():
            for path in ("dataloader", "device"):
                r = rate(spec, sets[name], path, args.batch, args.steps, device)
                best[name, path] = max(best.get((name, path), 0.0), r)
    print(f"\nloader, {args.device}, batch {args.batch}, {args.steps} batches x {args.reps} reps "
          f"(best), {torch.get_num_threads()} threads")
    print("| data | DataLoader images/s | on-device images/s | ratio |\n|---|---|---|---|")
    for name in specs:
        old, new = best[name, "dataloader"], best[name, "device"]
        print(f"| {name} | {old:,.0f} | {new:,.0f} | {new / old:.1f}x |")
    if args.step_steps:
        with tempfile.TemporaryDirectory() as tmp:
            sec = step_time("recipes/quickstart_digits.yaml", [], 5, args.step_steps, Path(tmp) / "q")
        print(f"\nquickstart training step (batch 64, data loading included): {64 / sec:,.0f} images/s")


if __name__ == "__main__":
    main()
