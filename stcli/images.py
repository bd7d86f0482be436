"""Writing images: grids of samples as PNG, written atomically."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from stcli.runlock import atomic


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save uint8 images (B, C, H, W) as one PNG grid (near-square by default)."""
    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    grid = make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()  # make_grid always returns 3 channels
    path = Path(path)
    with atomic(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
