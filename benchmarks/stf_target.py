"""Time and peak memory of the Stable Target Field target (the softmax-weighted mean over a
reference batch, stcli.components.stf.stf_target) for a batch of B noisy 32x32x3 images and n reference
images, on a device.

    python benchmarks/stf_target.py [--batch 128] [--n 4096] [--reps 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from stcli.components.stf import stf_target
from stcli.infra.console import info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator(dev).manual_seed(0)
    ref = torch.rand((args.n, 3, 32, 32), generator=g, device=dev) * 2 - 1
    x0 = ref[: args.batch]
    t = torch.rand(args.batch, generator=g, device=dev)
    mu, std = torch.exp(-0.5 * t), torch.sqrt(1 - torch.exp(-t))
    x_t = mu[:, None, None, None] * x0 + std[:, None, None, None] * torch.randn_like(x0)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(args.reps + 1):  # the first call is a warm-up
        t0 = time.perf_counter()
        out = stf_target(x_t, mu, std, ref)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    assert torch.isfinite(out).all() and out.shape == x_t.shape
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    ms = 1000 * sorted(times[1:])[len(times[1:]) // 2]
    info(f"stf target B={args.batch} n={args.n} on {dev}: {ms:.2f} ms (median of {args.reps}), "
         f"peak extra memory {peak / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
