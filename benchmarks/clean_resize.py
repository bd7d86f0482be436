"""st's `clean` resize against clean-fid's own resizer, pixel by pixel.

    pip install clean-fid   # only for this measurement; st does not depend on it
    python benchmarks/clean_resize.py [--n 256]

clean-fid ("clean" mode) resizes each channel as a float image with PIL bicubic and feeds the
float result, clipped to [0, 255], to its Inception network.  torch-fidelity's Inception takes
uint8, so st resizes the uint8 RGB image with PIL bicubic, which rounds.  This prints the
largest and mean absolute pixel difference between the two at 299x299, for smooth images
(gradients with noise) at the paper's resolutions.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stcli.components.metrics import clean_resize
from stcli.infra.console import info


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, None, :, None] * rng.uniform(0.2, 1, (n, 1, 1, 3))
    return np.clip(ramp + rng.normal(0, 30, (n, size, size, 3)), 0, 255).astype(np.uint8)


def main() -> None:
    from cleanfid.resize import make_resizer

    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=256)
    args = p.parse_args()
    theirs = make_resizer("PIL", False, "bicubic", (299, 299))
    for size in (32, 48, 64, 256):
        diffs = []
        for x in images(args.n, size):
            ours = clean_resize(torch.from_numpy(x).permute(2, 0, 1)).permute(1, 2, 0).numpy()
            diffs.append(np.abs(ours.astype(np.float64) - theirs(x).astype(np.float64)))
        d = np.stack(diffs)
        info(f"{size:>3}x{size:<3} -> 299x299, {args.n} images: max |st - clean-fid| "
             f"{d.max():.3f}, mean {d.mean():.3f} (of 255)")


if __name__ == "__main__":
    main()
