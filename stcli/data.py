"""Datasets: image sets as uint8 (C, H, W) tensors, and 2-D toy distributions.

A dataset spec's ``create(split)`` returns a ``torch.utils.data.Dataset`` of unlabelled items;
``transform`` maps a batch to the model's float32 input (flip, dequantisation, scaling to
[-1, 1] or [0, 1]) with all randomness drawn from one generator, so that it is reproducible
bit for bit; ``to_uint8`` maps model outputs back to pixels.  Only cifar10 and stl10 may
download (through torchvision); every other dataset reads local files and nothing else.
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import NonNegativeInt, PositiveFloat, PositiveInt, model_validator
from torch.utils.data import Dataset

from stcli.errors import UserError, plain_message
from stcli.registry import DATASETS, Component

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class InMemory(Dataset):
    """Items are the rows of one tensor held in memory."""

    def __init__(self, data: torch.Tensor):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        """A whole batch by one indexing op (the DataLoader's batched fetch)."""
        return self.data[torch.as_tensor(indices, dtype=torch.long)]


def collate(items) -> torch.Tensor:
    """A batch as one tensor: as fetched by ``__getitems__``, or stacked from single items."""
    return items if torch.is_tensor(items) else torch.stack(items)


class ImageFiles(Dataset):
    """Items are image files, read and preprocessed by ``load(path)`` on access."""

    def __init__(self, paths: list[Path], load):
        self.paths, self.load = paths, load

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return self.load(self.paths[i])
        except (OSError, SyntaxError, ValueError) as err:  # PIL: unreadable, truncated, bad header
            raise UserError(f"cannot read the image {self.paths[i]}: {err}") from None


def _center_crop(img, size: int):
    left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def read_image(path: Path, size: int, pre_crop: int | None = None) -> torch.Tensor:
    """RGB uint8 (3, size, size): optional centre crop to pre_crop, short side resized to size
    (PIL bicubic, which antialiases when shrinking), then centre crop to size."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
    if pre_crop:
        img = _center_crop(img, pre_crop)
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    return torch.from_numpy(np.array(_center_crop(img, size))).permute(2, 0, 1).contiguous()


def decode_all(data: Dataset, batch: int = 256) -> torch.Tensor:
    """Every item of a file-backed dataset in one uint8 tensor, decoded by parallel workers."""
    workers = min(8, os.cpu_count() or 1) if len(data) > 4 * batch else 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
    try:
        return torch.cat(list(loader))
    except UserError as err:  # from a worker: its message, not its traceback
        raise UserError(plain_message(err)) from None


def resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): antialiased bilinear, rounded, chunked."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.cat([
        F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
        .round_().clamp_(0, 255).to(torch.uint8)
        for c in x.split(chunk)
    ])


class DataSpec(Component):
    """What every dataset offers: named splits, ``shape``, ``dim``, ``create(split)``."""

    splits: ClassVar[tuple[str, ...]] = ("train", "test")

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def create(self, split: str = "train", **unknown: Any) -> Dataset:
        """The dataset of ``split``; other build-time keywords are unknown fields."""
        if unknown:
            raise UserError(f"dataset {self.name!r}: unknown field(s) {', '.join(sorted(unknown))}")
        if split not in self.splits:
            raise UserError(f"dataset {self.name!r} has no split {split!r}; "
                            f"valid splits: {', '.join(self.splits)}")
        data = self.load(split)
        if getattr(self, "in_memory", False) and not isinstance(data, InMemory):
            data = InMemory(decode_all(data))
        return data

    def load(self, split: str) -> Dataset:
        raise NotImplementedError

    def for_evaluation(self) -> DataSpec:
        """This data set as likelihood evaluation sees it (images: uniform dequantisation, no
        flips); itself for data without such options."""
        return self


class ImageData(DataSpec):
    """Images as uint8 (C, image_size, image_size) tensors read from ``root``."""

    channels: ClassVar[int] = 3
    native_size: ClassVar[int | None] = None  # the only image_size allowed, if any
    downloadable: ClassVar[bool] = False

    root: str = "data"
    image_size: PositiveInt = 32
    centered: bool = True
    random_flip: bool = False
    dequantization: Literal["none", "uniform"] = "none"
    download: bool = False
    in_memory: bool = False  # decode every image file once, at start (fast STF reference batches)

    def for_evaluation(self) -> ImageData:
        return self.model_copy(update={"dequantization": "uniform", "random_flip": False})

    @model_validator(mode="after")
    def _check_size_and_download(self):
        if self.native_size and self.image_size != self.native_size:
            raise ValueError(f"{self.name} images are {self.native_size}x{self.native_size}; "
                             f"image_size must be {self.native_size}, got {self.image_size}")
        if self.download and not self.downloadable:
            raise ValueError(f"{self.name} cannot be downloaded (download=true works only for "
                             f"cifar10 and stl10); place its files under root")
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def transform(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        """uint8 (B, C, H, W) -> float32 on the same device (the generator's device too): flip
        each sample with probability 1/2 (decisions drawn first), then x = (k + U)/256 with
        U ~ U[0, 1) ("uniform") or x = k/255 ("none"), then 2x - 1 if centered."""
        x = batch.float()
        if self.random_flip:
            flip = torch.rand(len(x), generator=generator, device=x.device) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.dequantization == "uniform":
            u = torch.rand(x.shape, generator=generator, device=x.device)
            x = (x + u.clamp_(max=1 - 2**-16)) / 256  # the clamp keeps k + u < k + 1 in float32
        else:
            x = x / 255
        return 2 * x - 1 if self.centered else x

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of ``transform`` for model outputs: k = round(255 x01), clamped to 0..255."""
        x01 = (x + 1) / 2 if self.centered else x
        return (255 * x01).round().clamp(0, 255).to(torch.uint8)

    def picture(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as uint8 images (B, C, H, W) for a grid."""
        return self.to_uint8(x)


@DATASETS.register
class Digits(ImageData):
    """scikit-learn's bundled 8x8 digits (no network): upscaled to image_size - 2 padding
    (antialiased bilinear), zero-padded.  train = first 1500, test = the other 297."""

    name: Literal["digits"] = "digits"
    channels: ClassVar[int] = 1
    splits: ClassVar[tuple[str, ...]] = ("train", "test", "all")
    ranges: ClassVar[dict[str, slice]] = {"train": slice(1500), "test": slice(1500, None),
                                          "all": slice(None)}
    padding: NonNegativeInt | None = None  # None: image_size // 8

    @property
    def pad(self) -> int:
        return self.image_size // 8 if self.padding is None else self.padding

    @model_validator(mode="after")
    def _room_for_digit(self):
        if self.image_size - 2 * self.pad < 1:
            raise ValueError(f"padding {self.pad} leaves no room in image_size {self.image_size}")
        return self

    def load(self, split: str) -> Dataset:
        from sklearn.datasets import load_digits

        v = torch.from_numpy(load_digits().images[self.ranges[split]])
        k = (v * 255 / 16).round().to(torch.uint8)[:, None]
        p = self.pad
        return InMemory(F.pad(resize(k, self.image_size - 2 * p), (p, p, p, p)))


@DATASETS.register
class Folder(ImageData):
    """Every png/jpg/jpeg/bmp/webp under root (recursive, sorted), as RGB: short side resized
    to image_size (bicubic), centre-cropped.  If root/train and root/test exist they are the
    splits; otherwise all images are train."""

    name: Literal["folder"] = "folder"

    def load(self, split: str) -> Dataset:
        root = Path(self.root)
        if not root.is_dir():
            raise UserError(f"dataset 'folder': image folder {root} does not exist")
        if (root / "train").is_dir() and (root / "test").is_dir():
            root = root / split
        elif split != "train":
            raise UserError(f"dataset 'folder': {root} has no 'train' and 'test' subfolders, "
                            f"so it only has a 'train' split")
        paths = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise UserError(f"dataset 'folder': no images ({', '.join(IMAGE_EXTENSIONS)}) "
                            f"under {root}")
        return ImageFiles(paths, partial(read_image, size=self.image_size))


def _torchvision(spec: ImageData, cls, folder: str, **kwargs):
    """torchvision's ``cls`` under spec.root; missing data and failed downloads as UserErrors."""
    try:
        return cls(spec.root, download=spec.download, **kwargs)
    except RuntimeError as err:
        if "not found" not in str(err):
            raise
        raise UserError(f"dataset {spec.name!r}: no data found in {Path(spec.root) / folder}; "
                        f"set data.download=true to fetch it, or place the extracted {folder!r} "
                        f"folder in {spec.root}") from None
    except OSError as err:
        raise UserError(f"dataset {spec.name!r}: cannot read or download it in {spec.root}: "
                        f"{err}") from None


@DATASETS.register
class Cifar10(ImageData):
    """CIFAR-10 (torchvision), 32x32; splits train/test."""

    name: Literal["cifar10"] = "cifar10"
    native_size: ClassVar[int | None] = 32
    downloadable: ClassVar[bool] = True

    def load(self, split: str) -> Dataset:
        from torchvision.datasets import CIFAR10

        ds = _torchvision(self, CIFAR10, "cifar-10-batches-py", train=split == "train")
        return InMemory(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous())


@DATASETS.register
class STL10(ImageData):
    """STL-10 (torchvision), 96x96 resized to image_size (antialiased bilinear)."""

    name: Literal["stl10"] = "stl10"
    splits: ClassVar[tuple[str, ...]] = ("train", "test", "unlabeled", "train+unlabeled")
    downloadable: ClassVar[bool] = True
    image_size: PositiveInt = 48

    def load(self, split: str) -> Dataset:
        from torchvision.datasets import STL10 as TorchSTL10

        ds = _torchvision(self, TorchSTL10, "stl10_binary", split=split)
        return InMemory(resize(torch.from_numpy(ds.data), self.image_size))


@DATASETS.register
class CelebA(ImageData):
    """CelebA aligned faces as in score_sde: centre crop 140x140, resized to image_size
    (bicubic).  Splits from list_eval_partition.txt; without it every image is train."""

    name: Literal["celeba"] = "celeba"
    splits: ClassVar[tuple[str, ...]] = ("train", "valid", "test")
    layout: ClassVar[str] = ("<root>/img_align_celeba/000001.jpg, ... and optionally "
                             "<root>/list_eval_partition.txt (lines '000001.jpg 0'; "
                             "0=train, 1=valid, 2=test)")
    image_size: PositiveInt = 64

    def load(self, split: str) -> Dataset:
        folder = Path(self.root) / "img_align_celeba"
        partition = Path(self.root) / "list_eval_partition.txt"
        if not folder.is_dir():
            raise UserError(f"dataset 'celeba': no folder {folder}; expected layout: "
                            f"{self.layout}.  Automatic download is not supported (torchvision's "
                            f"CelebA downloader is unreliable): extract img_align_celeba.zip "
                            f"into {self.root}")
        if partition.is_file():
            index = str(self.splits.index(split))
            rows = (line.split() for line in partition.read_text().splitlines() if line.strip())
            paths = [folder / file for file, part in rows if part == index]
        elif split == "train":
            paths = sorted(folder.glob("*.jpg"))
        else:
            raise UserError(f"dataset 'celeba': split {split!r} needs {partition} ({self.layout})")
        return ImageFiles(paths, partial(read_image, size=self.image_size, pre_crop=140))


@DATASETS.register
class ImageNet32(ImageData):
    """Downsampled ImageNet 32x32 (npz release): rows of 3072 uint8, the R, G then B plane.
    Splits train (10 batches) and test (the validation set)."""

    name: Literal["imagenet32"] = "imagenet32"
    native_size: ClassVar[int | None] = 32
    layout: ClassVar[str] = ("<root>/Imagenet32_train_npz/train_data_batch_{1..10}.npz and "
                             "<root>/Imagenet32_val_npz/val_data.npz, each with key 'data' "
                             "of shape (N, 3072) uint8")

    def load(self, split: str) -> Dataset:
        files = ([f"Imagenet32_train_npz/train_data_batch_{i}.npz" for i in range(1, 11)]
                 if split == "train" else ["Imagenet32_val_npz/val_data.npz"])
        paths = [Path(self.root) / f for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"dataset 'imagenet32': missing {', '.join(missing)}; "
                            f"expected layout: {self.layout}")
        rows = np.concatenate([self._rows(p) for p in paths])
        return InMemory(torch.from_numpy(rows).view(-1, 3, 32, 32))

    def _rows(self, path: Path) -> np.ndarray:
        with np.load(path, allow_pickle=False) as z:
            data = z["data"] if "data" in z else None
        if data is None or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"dataset 'imagenet32': {path} has no 'data' array of shape (N, 3072)")
        return data.astype(np.uint8, copy=False)


@DATASETS.register
class Toy2D(DataSpec):
    """2-D toy data: a ring of equally weighted Gaussians ("gmm") or the 4x4 checkerboard on
    [-2, 2]^2 ("checkerboard").  Split train is drawn with seed 2 seed, test with 2 seed + 1."""

    name: Literal["toy2d"] = "toy2d"
    kind: Literal["gmm", "checkerboard"] = "gmm"
    n: PositiveInt = 10000
    seed: NonNegativeInt = 0
    modes: PositiveInt = 8
    radius: float = 2.0
    mode_std: PositiveFloat = 0.1

    @property
    def shape(self) -> tuple[int, ...]:
        return (2,)

    def gmm_params(self) -> tuple[torch.Tensor, float, torch.Tensor]:
        """(means (K, 2) on the circle of ``radius``, std, weights (K,)), in float64."""
        if self.kind != "gmm":
            raise UserError(f"dataset 'toy2d' of kind {self.kind!r} has no gmm parameters")
        angle = 2 * math.pi * torch.arange(self.modes, dtype=torch.float64) / self.modes
        means = self.radius * torch.stack([angle.cos(), angle.sin()], 1)
        weights = torch.full((self.modes,), 1 / self.modes, dtype=torch.float64)
        return means, self.mode_std, weights

    def load(self, split: str) -> Dataset:
        g = torch.Generator().manual_seed(2 * self.seed + self.splits.index(split))
        if self.kind == "gmm":
            means, std, _ = self.gmm_params()
            k = torch.randint(self.modes, (self.n,), generator=g)
            x = means[k] + std * torch.randn(self.n, 2, generator=g, dtype=torch.float64)
        else:  # a column c, one of its 2 rows r with c + r even, a point of that unit square
            c = torch.randint(4, (self.n,), generator=g) - 2
            r = 2 * torch.randint(2, (self.n,), generator=g) - 2 + c % 2
            u = torch.randint(2**20, (self.n, 2), generator=g) / 2**20  # exact in float32
            x = torch.stack([c, r], 1) + u
        return InMemory(x.float())

    def transform(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        """Identity, as float32."""
        return batch.float()

    def picture(self, x: torch.Tensor, size: int = 128, extent: float = 3.0) -> torch.Tensor:
        """Samples as one uint8 image (1, 1, size, size): their 2-D histogram on
        [-extent, extent]^2 (y up), with square-root contrast."""
        ij = ((x.float().cpu() + extent) / (2 * extent) * size).long()
        ij = ij[((ij >= 0) & (ij < size)).all(1)]
        counts = torch.bincount((size - 1 - ij[:, 1]) * size + ij[:, 0], minlength=size * size)
        img = counts.float().sqrt()
        img = (255 * img / img.max().clamp(min=1)).round().to(torch.uint8)
        return img.view(1, 1, size, size)
