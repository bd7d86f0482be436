"""stcli.infra.images.read_pixels / read_header: every image kind against an expectation computed
without PIL's conversions, and the readers of `st fid` and the folder dataset end to end."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import st
from PIL import Image, ImageFile

from stcli.components import metrics
from stcli.infra.errors import UserError
from stcli.infra.images import MAX_PIXELS, read_header, read_pixels

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma, rounded: what "RGB" -> "L" gives."""
    return np.rint(rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).astype(np.uint8)


def png(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG file written chunk by chunk (PIL writes no 16-bit colour PNG); rows: raw bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj()
    idat = b"".join(z.compress(b"\0" + row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def black_png(path, width: int, height: int):
    """A valid all-black 1-bit PNG, a few kB however large (no pixel array is made)."""
    path.write_bytes(png(width, height, 1, 0, (bytes((width + 7) // 8) for _ in range(height))))
    return path


# --- integer depths ---------------------------------------------------------------------------
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    v = PICTURE[..., 0]
    Image.fromarray(v).save(tmp_path / "8.png")
    Image.fromarray(v.astype(np.uint16) * 257).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    assert np.array_equal(read_pixels(tmp_path / "16.png", "L")[..., 0], v)
    assert np.array_equal(read_pixels(tmp_path / "16.png"), read_pixels(tmp_path / "8.png"))
    assert np.array_equal(read_pixels(tmp_path / "16.png"), np.repeat(v[..., None], 3, axis=2))
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # all values: round(v * 255 / 65535)
    Image.fromarray(every).save(tmp_path / "all.png")
    expected = np.floor(every / 65535 * 255 + 0.5).astype(np.uint8)
    assert np.array_equal(read_pixels(tmp_path / "all.png", "L")[..., 0], expected)


def test_32_bit_integer_images_are_16_bit_values_or_refused(tmp_path):
    v = PICTURE[..., 1]
    Image.fromarray(v.astype(np.int32) * 257).save(tmp_path / "i.tiff")
    assert Image.open(tmp_path / "i.tiff").mode == "I"
    assert np.array_equal(read_pixels(tmp_path / "i.tiff", "L")[..., 0], v)
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)).save(tmp_path / "big.tiff")
    with pytest.raises(UserError, match="outside \\[0, 65535\\]"):
        read_pixels(tmp_path / "big.tiff")


def test_float_images_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(UserError, match=f"{tmp_path / 'f.tiff'}.*mode F"):
        read_pixels(tmp_path / "f.tiff")


def test_48_bit_rgb_png_keeps_the_high_byte(tmp_path):
    v16 = RNG.integers(0, 65536, PICTURE.shape, dtype=np.uint16)
    for name, values in (("exact.png", PICTURE.astype(np.uint16) * 257), ("any.png", v16)):
        rows = (row.astype(">u2").tobytes() for row in values)
        (tmp_path / name).write_bytes(png(20, 12, 16, 2, rows))
    assert np.array_equal(read_pixels(tmp_path / "exact.png"), PICTURE)
    any16 = read_pixels(tmp_path / "any.png")
    assert np.array_equal(any16, (v16 // 256).astype(np.uint8))
    assert np.abs(any16.astype(int) - np.rint(v16 / 65535 * 255)).max() <= 1


def test_1_bit_reads_as_0_and_255(tmp_path):
    bits = PICTURE[..., 0] > 127
    Image.fromarray(bits).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert np.array_equal(read_pixels(tmp_path / "b.png", "L")[..., 0], bits * np.uint8(255))


# --- palette and alpha ------------------------------------------------------------------------
PALETTE = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], dtype=np.uint8)


@pytest.mark.parametrize("transparency", [None, 0, bytes([0, 128, 255, 255])])
def test_palette_images_read_as_their_colours(tmp_path, transparency):
    index = RNG.integers(0, 4, (6, 9), dtype=np.uint8)
    img = Image.fromarray(index, "P")
    img.putpalette(PALETTE.ravel().tolist())
    img.save(tmp_path / "p.png", **({} if transparency is None else {"transparency": transparency}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns on convert("RGB") of P with tRNS bytes
        rgb = read_pixels(tmp_path / "p.png")
        gray = read_pixels(tmp_path / "p.png", "L")
    assert np.array_equal(rgb, PALETTE[index])
    assert np.array_equal(gray[..., 0], luma(PALETTE[index]))


def test_alpha_is_dropped(tmp_path):
    alpha = RNG.integers(0, 256, PICTURE.shape[:2], dtype=np.uint8)
    Image.fromarray(np.dstack([PICTURE, alpha])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([PICTURE[..., 0], alpha])).save(tmp_path / "la.png")
    assert np.array_equal(read_pixels(tmp_path / "rgba.png"), PICTURE)
    assert np.array_equal(read_pixels(tmp_path / "rgba.png", "L")[..., 0], luma(PICTURE))
    assert np.array_equal(read_pixels(tmp_path / "la.png", "L")[..., 0], PICTURE[..., 0])
    assert np.array_equal(read_pixels(tmp_path / "la.png"), np.repeat(PICTURE[..., :1], 3, axis=2))


def test_cmyk_jpeg(tmp_path):
    c, m, y, k = 40, 120, 200, 30
    Image.new("CMYK", (16, 16), (c, m, y, k)).save(tmp_path / "c.jpg", quality=95)
    expected = [(255 - v) * (255 - k) / 255 for v in (c, m, y)]
    assert np.abs(read_pixels(tmp_path / "c.jpg") - np.array(expected)).max() <= 2


# --- orientation ------------------------------------------------------------------------------
@pytest.mark.parametrize(("orientation", "upright"), [
    (3, lambda a: np.rot90(a, 2)), (6, lambda a: np.rot90(a, -1)), (8, lambda a: np.rot90(a, 1))])
@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_orientation_is_applied(tmp_path, orientation, upright, fmt):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o.{fmt}"
    Image.fromarray(PICTURE).save(path, exif=exif, quality=95)
    with Image.open(path) as img:  # the stored pixels (JPEG: as decoded), not turned
        stored = np.array(img)
    assert fmt == "jpg" or np.array_equal(stored, PICTURE)
    expected = upright(stored)
    assert np.array_equal(read_pixels(path), expected)
    assert read_header(path) == ((expected.shape[1], expected.shape[0]), "RGB")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_exif_that_cannot_be_parsed_is_no_orientation(tmp_path, fmt):
    path = tmp_path / f"e.{fmt}"
    Image.fromarray(PICTURE).save(path, exif=b"Exif\x00\x00not a TIFF header", quality=95)
    with Image.open(path) as img:
        stored = np.array(img)
    assert np.array_equal(read_pixels(path), stored)
    assert read_header(path) == ((20, 12), "RGB")


# --- size limit and unreadable files ----------------------------------------------------------
@pytest.mark.parametrize("side", [14000, 10000])  # beyond PIL's error limit; in its warning band
def test_a_huge_image_is_refused_from_its_header(tmp_path, monkeypatch, side):
    path = black_png(tmp_path / "huge.png", side, side)

    def load(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    for read in (read_pixels, read_header):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no DecompressionBombWarning either
            with pytest.raises(UserError) as err:
                read(path)
        message = str(err.value)
        assert "\n" not in message
        for needle in (str(path), f"{side}x{side}", str(side * side), str(MAX_PIXELS)):
            assert needle in message, (needle, message)


def test_the_limit_is_inclusive(tmp_path):
    assert read_header(black_png(tmp_path / "at.png", 8192, 8192)) == ((8192, 8192), "1")
    with pytest.raises(UserError, match="8193x8192"):
        read_header(black_png(tmp_path / "over.png", 8193, 8192))


@pytest.mark.parametrize("content", [b"not an image", b"\x89PNG\r\n\x1a\n broken", "truncated", b"", b"\x00"])
def test_unreadable_files_are_user_errors(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:-200]
    path.write_bytes(content)
    with pytest.raises(UserError, match=f"cannot read the image {path}"):
        read_pixels(path)


# --- end to end -------------------------------------------------------------------------------
def test_st_fid_between_8_and_16_bit_copies_is_zero(tmp_path, capsys, monkeypatch):
    def refuse(url, target):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(metrics, "_download", refuse)
    pictures = RNG.integers(0, 256, (96, 16, 16), dtype=np.uint8)
    for depth, values in ((8, pictures), (16, pictures.astype(np.uint16) * 257)):
        (tmp_path / str(depth)).mkdir()
        for i, x in enumerate(values):
            Image.fromarray(x).save(tmp_path / str(depth) / f"{i}.png")
    code, _, err = st(capsys, "fid", tmp_path / "16", "--ref", tmp_path / "8", "--json",
                      tmp_path / "r.json", "--feature-extractor", "st-random-64", "--device", "cpu",
                      "--batch-size", "32", "--cache-dir", tmp_path / "cache")
    assert code == 0, err
    assert abs(json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"]) < 1e-9


@pytest.mark.parametrize("data", [
    {},  # channels auto: refused by the scan of the headers, before training
    {"channels": 3},  # refused when read during training
    {"channels": 3, "in_memory": True},  # refused when the set is decoded, before training
])
def test_a_huge_image_in_a_folder_dataset_is_refused_in_one_line(tiny_recipe, tmp_path, capsys, data):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(16):
        Image.fromarray(PICTURE).save(images / f"{i:02d}.png")
    huge = black_png(images / "00huge.png", 14000, 14000)  # first in order; mode "1": gray
    recipe = tiny_recipe("run", train={"batch_size": 4})
    spec = yaml.safe_load(recipe.read_text())
    spec["data"] = {"name": "folder", "root": str(images), "image_size": 8, **data}
    recipe.write_text(yaml.safe_dump(spec))
    code, out, err = st(capsys, "train", recipe)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    (line,) = err.strip().splitlines()
    assert line.startswith("error: ") and f"{huge} is 14000x14000 = 196000000 pixels" in line, err
    assert not Path(spec["train"]["out_dir"]).exists()  # refused before the run folder is made
    huge.unlink()
    (images / "zz_notes.png").write_text("not an image")  # last in order: found before training too
    code, out, err = st(capsys, "train", recipe)
    assert code == 2 and "zz_notes.png" in err and not Path(spec["train"]["out_dir"]).exists(), err


def test_grids_enlarge_small_images_by_whole_pixels_and_keep_large_ones(tmp_path):
    from stcli.infra.images import GRID_MIN_SIDE, save_grid

    small = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)
    save_grid(small, tmp_path / "small.png", nrow=3)
    grid = np.asarray(Image.open(tmp_path / "small.png"))
    f = GRID_MIN_SIDE // 8
    assert grid.shape == (f * 8 + 4, 3 * f * 8 + 8, 3)
    first = grid[2:2 + f * 8, 2:2 + f * 8, 0]  # each pixel a f x f block, values unchanged
    assert np.array_equal(first, np.kron(small[0, 0].numpy(), np.ones((f, f), np.uint8)))
    large = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    save_grid(large, tmp_path / "large.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "large.png"))[2:66, 2:66],
                          large[0].permute(1, 2, 0).numpy())
