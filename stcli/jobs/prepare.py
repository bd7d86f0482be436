"""`st data prepare NAME --from SOURCE --out DIR`: a data set's official release, as downloaded,
laid out the way st's data sets read it.

- celeba: ``img_align_celeba.zip`` (+ ``list_eval_partition.txt``) -> ``DIR/img_align_celeba/
  *.jpg`` and ``DIR/list_eval_partition.txt`` (the JPEG files copied byte for byte).
- imagenet32: the PNG tarballs (``train_32x32.tar`` / ``valid_32x32.tar``, or
  ``Imagenet32_train.tar`` / ``Imagenet32_val.tar``) -> ``DIR/train_32x32/*.png`` and
  ``DIR/valid_32x32/*.png`` (copied byte for byte, each checked to be a 32x32 PNG).
- celebahq: a folder of the square CelebA-HQ images (1024x1024) -> ``DIR/*.png`` at ``size``,
  each pixel the mean of its factor x factor block, as the progressive-GAN data set tool halves
  resolutions by averaging 2x2 blocks.

Everything is checked before anything is visible: files are written into a hidden staging
folder in DIR and renamed into place at the end, or removed if a check fails.
"""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from stcli.components.data import celeba_partition
from stcli.infra.console import StepProgress, info
from stcli.infra.errors import UserError
from stcli.infra.images import read_header, read_pixels

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
IMAGENET32_TARS = {"train_32x32.tar": "train_32x32", "valid_32x32.tar": "valid_32x32",
                   "Imagenet32_train.tar": "train_32x32", "Imagenet32_val.tar": "valid_32x32"}


class Staging:
    """Folders of DIR (``"."``: DIR itself), each written under a hidden twin first and moved
    into place by ``commit``; removed if anything fails before."""

    def __init__(self, out: Path, targets: list[str]):
        for name in targets:
            final = out / name
            if final.exists() and (final.is_file() or any(final.iterdir())):
                raise UserError(f"{final.resolve()} already exists and is not empty; remove it "
                                f"or choose another --out")
        self.out, self.targets, self.created_out = out, targets, not out.exists()

    def path(self, name: str) -> Path:
        return self.out / f".{name.strip('.') or 'images'}.partial"

    def __enter__(self) -> Staging:
        for name in self.targets:
            shutil.rmtree(self.path(name), ignore_errors=True)
            self.path(name).mkdir(parents=True)
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            return self.commit()
        for name in self.targets:
            shutil.rmtree(self.path(name), ignore_errors=True)
        if self.created_out and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()

    def commit(self) -> None:
        for name in self.targets:
            stage, final = self.path(name), self.out / name
            if name == ".":
                for f in stage.iterdir():
                    f.rename(self.out / f.name)
                stage.rmdir()
                continue
            if final.is_dir():
                final.rmdir()  # empty, checked above
            stage.rename(final)


def prepare(name: str, source: Path, out: Path, size: int | None = None, workers: int = 4) -> None:
    """Convert the release at `source` into `out` (see the module docstring)."""
    if name not in PREPARERS:
        raise UserError(f"st data prepare: unknown data set {name!r}; choose one of "
                        f"{', '.join(PREPARERS)}")
    if size is not None and name != "celebahq":
        raise UserError(f"--size applies to celebahq only; {name} keeps its release's size")
    if not source.exists():
        raise UserError(f"--from {source} does not exist (looked for {source.resolve()})")
    PREPARERS[name](source, out, size=size or 256, workers=workers)


# --- CelebA -------------------------------------------------------------------------------------
def prepare_celeba(source: Path, out: Path, **_) -> None:
    archive = _find(source, ["img_align_celeba.zip"], "CelebA's img_align_celeba.zip")
    partition = next((p for p in _candidates(source, archive, "list_eval_partition.txt")
                      if p.is_file()), None)
    with _open_zip(archive) as zf:
        members = {Path(m.filename).name: m for m in zf.infolist()
                   if re.fullmatch(r"(.*/)?img_align_celeba/[^/]+\.jpg", m.filename)}
        if not members:
            raise UserError(f"{archive} holds no img_align_celeba/*.jpg; is it CelebA's "
                            f"'Align&Cropped Images' archive?")
        listed = _read_partition(partition, members) if partition else None
        if partition and (out / partition.name).exists():
            raise UserError(f"{(out / partition.name).resolve()} already exists; remove it or "
                            f"choose another --out")
        with Staging(out, ["img_align_celeba"]) as stage:
            folder = stage.path("img_align_celeba")
            try:
                for file in _progress("celeba", sorted(members)):
                    with zf.open(members[file]) as src, open(folder / file, "wb") as dst:
                        shutil.copyfileobj(src, dst)
            except zipfile.BadZipFile as err:
                raise UserError(f"{archive} is damaged: {err}") from None
    if partition:
        shutil.copyfile(partition, out / partition.name)
        counts = Counter(listed.values())
        info(f"celeba: {len(members)} images (train {counts['0']}, valid {counts['1']}, "
             f"test {counts['2']}) -> {out.resolve()}")
    else:
        info(f"celeba: {len(members)} images -> {out.resolve()}; no list_eval_partition.txt "
             f"next to {archive.name}, so only the train split exists (every image); put the "
             f"file in {out.resolve()} for the valid and test splits")


def _read_partition(path: Path, members: dict) -> dict[str, str]:
    listed = celeba_partition(path)
    missing = sorted(set(listed) - set(members))
    if missing:
        raise UserError(f"{path} lists {len(missing)} image(s) that the archive lacks, e.g. "
                        f"{missing[0]}; are the archive and the partition file from the same "
                        f"release?")
    return listed


# --- ImageNet32 ---------------------------------------------------------------------------------
def prepare_imagenet32(source: Path, out: Path, **_) -> None:
    tars = _imagenet32_tars(source)
    with Staging(out, sorted(set(tars.values()))) as stage:
        for tar, folder in tars.items():
            n = _copy_pngs(tar, stage.path(folder))
            info(f"imagenet32: {n} images from {tar.name} -> {(out / folder).resolve()}")


def _imagenet32_tars(source: Path) -> dict[Path, str]:
    """The tarballs to convert, each with its folder: SOURCE itself, or those in SOURCE."""
    if source.is_file():
        if source.name not in IMAGENET32_TARS:
            raise UserError(f"{source.name} is not an ImageNet32 PNG tarball (expected one of "
                            f"{', '.join(IMAGENET32_TARS)})")
        return {source: IMAGENET32_TARS[source.name]}
    found = {source / name: folder for name, folder in IMAGENET32_TARS.items()
             if (source / name).is_file()}
    if not found:
        raise UserError(f"no ImageNet32 PNG tarball ({', '.join(IMAGENET32_TARS)}) in "
                        f"{source.resolve()}")
    twice = [f for f, n in Counter(found.values()).items() if n > 1]
    if twice:
        raise UserError(f"{source.resolve()} holds two tarballs for {twice[0]} ("
                        f"{', '.join(p.name for p, f in found.items() if f == twice[0])}); "
                        f"pass the one to use as --from")
    return found


def _copy_pngs(path: Path, folder: Path) -> int:
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.lower().endswith(".png")]
            names = Counter(Path(m.name).name for m in members)
            if not members:
                raise UserError(f"{path} holds no .png files")
            clash = next((n for n, k in names.items() if k > 1), None)
            if clash:
                raise UserError(f"{path} holds several files named {clash} in different folders")
            for m in _progress(path.name, members):
                data = tar.extractfile(m).read()
                _check_png32(data, f"{path.name}:{m.name}")
                (folder / Path(m.name).name).write_bytes(data)
    except (tarfile.TarError, EOFError) as err:
        raise UserError(f"cannot read {path} as a tar archive: {err}") from None
    return len(members)


def _check_png32(data: bytes, where: str) -> None:
    """A PNG whose header (IHDR: width, height at bytes 16..24) says 32x32."""
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise UserError(f"{where} is not a PNG file")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if (width, height) != (32, 32):
        raise UserError(f"{where} is {width}x{height}, not 32x32; is this the 32x32 release?")


# --- CelebA-HQ ----------------------------------------------------------------------------------
def prepare_celebahq(source: Path, out: Path, size: int = 256, workers: int = 4) -> None:
    if not source.is_dir():
        raise UserError(f"--from for celebahq is the folder of CelebA-HQ images; {source} is a file")
    paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {source.resolve()}")
    clash = next((n for n, k in Counter(p.stem for p in paths).items() if k > 1), None)
    if clash:
        raise UserError(f"several images under {source} are named {clash}.*")
    for p in paths:  # headers only
        (w, h), _ = read_header(p)
        if w != h or w % size:
            raise UserError(f"{p} is {w}x{h}; CelebA-HQ images are square with a side that is a "
                            f"multiple of --size {size}")
    with Staging(out, ["."]) as stage:
        with ThreadPoolExecutor(max(1, workers)) as pool:
            done = pool.map(_downscaler(stage.path("."), size), paths)
            for _ in _progress("celebahq", paths):
                next(done)
    info(f"celebahq: {len(paths)} images at {size}x{size} -> {out.resolve()}")


def _downscaler(folder: Path, size: int) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        from PIL import Image

        img = Image.fromarray(read_pixels(path, "RGB"))
        factor = img.size[0] // size
        small = img.reduce(factor) if factor > 1 else img  # the mean of each factor x factor block
        small.save(folder / f"{path.stem}.png")

    return write


# --- shared -------------------------------------------------------------------------------------
def _find(source: Path, names: list[str], what: str) -> Path:
    if source.is_file():
        return source
    found = next((source / n for n in names if (source / n).is_file()), None)
    if found is None:
        raise UserError(f"no {what} in {source.resolve()}")
    return found


def _candidates(source: Path, archive: Path, name: str) -> list[Path]:
    folders = [source] if source.is_dir() else []
    folders.append(archive.parent)
    return [f / sub / name for f in folders for sub in (".", "Eval")]


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise UserError(f"cannot read {path} as a zip archive: {err}") from None


def _progress(label: str, items: list):
    with StepProgress(f"prepare {label}", len(items)) as progress:
        for i, item in enumerate(items):
            yield item
            if (i + 1) % 1000 == 0 or i + 1 == len(items):
                progress.update(i + 1, {})


PREPARERS: dict[str, Callable[..., None]] = {
    "celeba": prepare_celeba, "imagenet32": prepare_imagenet32, "celebahq": prepare_celebahq}
