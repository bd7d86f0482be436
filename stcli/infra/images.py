"""Images: the one reader of image files (read_pixels, read_header), and grids of samples
written as PNG, atomically.

read_pixels turns every image kind into uint8 "RGB" or "L" pixels by one rule:

- 8-bit "L", "RGB": as stored; "RGB" -> "L" by PIL's luma (ITU-R 601-2), "L" -> "RGB" repeats it.
- 1-bit "1": 0 and 255.
- palette "P": the palette's colours, whatever the transparency (tRNS) says.
- alpha ("RGBA", "LA", "PA", palette transparency): dropped, never composited; the colours are
  read as stored, as PIL's convert("RGB") (and so clean-fid) reads "RGBA".
- 16-bit grayscale ("I;16", "I;16B", "I;16L", "I;16N"; PIL 13 opens a 16-bit PNG as "I;16"):
  v -> round(v * 255 / 65535), so a 16-bit image of v * 257 reads as the 8-bit image of v.
- 32-bit integer "I" (as older PIL versions opened 16-bit PNGs, and PIL 13 opens 16-bit PGM
  and integer TIFF): read as 16-bit values on the same scale; a value outside [0, 65535] is
  refused (UserError), since its scale is not in the file.
- 32-bit float "F": refused (UserError); its scale ([0, 1] or [0, 255]) is not in the file.
- 16 bits per channel in colour ("RGB", "RGBA", "LA" PNGs of 48, 64, 32 bits): PIL decodes them
  to 8 bits itself, keeping each sample's high byte (v // 256): v * 257 reads as v, and any v
  within 1 of round(v * 255 / 65535).
- "CMYK" (JPEG) and other modes: PIL's convert, without colour profiles.
- EXIF orientation (JPEG, PNG eXIf, WebP): applied, so the pixels are upright; EXIF that
  cannot be parsed counts as no orientation.

An image of more than MAX_PIXELS pixels is refused from its header, before any pixel is
decoded; a file that cannot be read is a UserError naming it.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from stcli.infra.errors import UserError
from stcli.infra.runlock import atomic

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 8192 * 8192  # 67,108,864: below PIL's own limit (89,478,485)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ROTATED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def read_pixels(path: str | Path, mode: str = "RGB") -> np.ndarray:
    """The image at path as uint8 (H, W, 3) for mode "RGB" or (H, W, 1) for "L", upright, by
    the rule in this module's docstring."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', not {mode!r}")
    with _checked(path) as img:
        img.load()
        try:
            ImageOps.exif_transpose(img, in_place=True)
        except (SyntaxError, ValueError, struct.error):
            pass  # EXIF that cannot be parsed: the pixels as stored
        array = np.array(_eight_bit(img, path).convert(mode))
    return array[..., None] if array.ndim == 2 else array


def read_header(path: str | Path) -> tuple[tuple[int, int], str]:
    """(width, height) as read_pixels returns the image (upright), and PIL's mode, from the
    file's header alone; the same refusals as read_pixels for large and unreadable files."""
    with _checked(path) as img:
        try:  # the EXIF read with the header: PngImageFile.getexif would decode the pixels
            orientation = Image.Image.getexif(img).get(ExifTags.Base.Orientation)
        except (SyntaxError, ValueError, struct.error):
            orientation = None  # as read_pixels: EXIF that cannot be parsed is no orientation
        return (img.size[::-1] if orientation in _ROTATED else img.size), img.mode


def _eight_bit(img: Image.Image, path: str | Path) -> Image.Image:
    """img in a mode that PIL's convert maps to "RGB" and "L" by the module's rule."""
    if img.mode == "F":
        raise UserError(f"cannot read the image {path}: 32-bit float pixels (mode F) have no "
                        f"known scale; save it with 8 or 16 bits per channel")
    if img.mode.startswith("I"):  # "I;16", "I;16B", "I;16L", "I;16N", "I"
        values = np.asarray(img)
        low, high = values.min(), values.max()
        if low < 0 or high > 65535:  # only "I" can hold such values
            raise UserError(f"cannot read the image {path}: 32-bit values outside [0, 65535] "
                            f"(from {low} to {high}); save it with 8 or 16 bits per channel")
        # round(v * 255 / 65535) = round(v / 257), never a tie; in integers:
        return Image.fromarray(((values.astype(np.uint32) * 255 + 32767) // 65535)
                               .astype(np.uint8))
    if img.mode in ("P", "PA"):
        return img.convert("RGBA")  # the palette's colours; its transparency is dropped after
    return img


@contextmanager
def _checked(path: str | Path) -> Iterator[Image.Image]:
    """The image at path, header read, at most MAX_PIXELS pixels; PIL's errors as UserErrors."""
    try:
        with _open(path) as img:
            width, height = img.size
            if width * height > MAX_PIXELS:
                side = math.isqrt(MAX_PIXELS)
                raise UserError(f"the image {path} is {width}x{height} = {width * height} "
                                f"pixels, more than the limit of {MAX_PIXELS} ({side}x{side}); "
                                f"downscale it first")
            yield img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read the image {path}: {err}") from None


def _open(path: str | Path) -> Image.Image:
    """PIL's Image.open without its pixel limit, which raises DecompressionBombError (or warns,
    below twice the limit) before the size can be reported: PIL's format plugins are tried in
    its order, as Image.open tries them, and _checked applies MAX_PIXELS."""
    Image.preinit()
    Image.init()
    with open(path, "rb") as f:
        prefix = f.read(16)
    if not prefix:
        raise UnidentifiedImageError(f"{os.fspath(path)!r} is an empty file")
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:  # a plugin's check of the first bytes may itself fail on a short file
            result = not accept or accept(prefix)
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
        if result and not isinstance(result, str):
            try:
                return factory(os.fspath(path), os.fspath(path))  # it opens and owns the file
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    raise UnidentifiedImageError(f"cannot identify image file {os.fspath(path)!r}")


GRID_MIN_SIDE = 48  # pixels: smaller images are enlarged (nearest) in a grid, to be seen


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> None:
    """Save uint8 images (B, C, H, W) as one PNG grid (near-square by default); images under
    GRID_MIN_SIDE pixels are enlarged by an integer factor, each pixel a square block."""
    from torchvision.utils import make_grid

    nrow = nrow or math.ceil(math.sqrt(images.shape[0]))
    factor = max(1, math.ceil(GRID_MIN_SIDE / max(images.shape[-2:])))
    images = images.cpu().repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
    array = grid.permute(1, 2, 0).numpy()  # make_grid always returns 3 channels
    path = Path(path)
    with atomic(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
