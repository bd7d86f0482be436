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
from pydantic import (
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)
from torch.utils.data import Dataset

from stcli.infra.errors import UserError, plain_message
from stcli.infra.images import GRAY_MODES, read_header, read_pixels
from stcli.infra.registry import DATASETS, Component

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


def data_digest(dataset: Dataset) -> dict[str, Any]:
    """What a run trained on, cheaply: the item count and the sha256 of the first, middle and
    last items' values (three decodes).  Another folder, images added or removed, or a relative
    data.root read from another working directory changes it."""
    import hashlib

    n = len(dataset)
    digest = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1} if n else set()):
        item = torch.as_tensor(dataset[i]).contiguous()
        digest.update(f"{i}:{item.dtype}:{tuple(item.shape)}:".encode())
        digest.update(item.cpu().numpy().tobytes())
    return {"items": n, "sha256": digest.hexdigest()}


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


def read_image(path: Path, size: int, pre_crop: int | None = None, mode: str = "RGB") -> torch.Tensor:
    """uint8 (3, size, size) RGB (or (1, size, size) for mode "L"): optional centre crop to
    pre_crop, short side resized to size (PIL bicubic, which antialiases when shrinking), then
    centre crop to size.  The pixels are read by stcli.infra.images.read_pixels."""
    from PIL import Image

    array = read_pixels(path, mode)
    img = Image.fromarray(array[..., 0] if mode == "L" else array)
    if pre_crop:
        img = _center_crop(img, pre_crop)
    w, h = img.size
    s = size / min(w, h)
    img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    array = np.array(_center_crop(img, size))
    return torch.from_numpy(array[..., None] if array.ndim == 2 else array).permute(2, 0, 1).contiguous()


def decode_all(data: Dataset, batch: int = 256) -> torch.Tensor:
    """Every item of a file-backed dataset in one uint8 tensor, decoded by parallel workers
    and copied batch by batch into that tensor (the set is never held twice)."""
    workers = min(8, os.cpu_count() or 1) if len(data) > 4 * batch else 0
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
    first = data[0]
    out = torch.empty((len(data), *first.shape), dtype=first.dtype)
    start = 0
    try:
        for part in loader:
            out[start:start + len(part)] = part
            start += len(part)
    except UserError as err:  # from a worker: its message, not its traceback
        raise UserError(plain_message(err)) from None
    return out


def resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): antialiased bilinear, rounded, chunked."""
    if x.shape[-2:] == (size, size):
        return x
    return torch.cat([
        F.interpolate(c.float(), size=(size, size), mode="bilinear", antialias=True)
        .round_().clamp_(0, 255).to(torch.uint8)
        for c in x.split(chunk)
    ])


# The layout each loader reads (when its own message does not say) and where the data set is
# published: the missing-data messages end with both.
SOURCES: dict[str, tuple[str | None, str]] = {
    "folder": ("image files (png, jpg, jpeg, bmp, webp) anywhere under <root>, or under "
               "<root>/train and <root>/test for two splits",
               "for CelebA-HQ 256x256 (the celebahq recipe), "
               "`st data prepare celebahq --from IMAGES --out ROOT` downscales the 1024x1024 "
               "images made by the progressive-GAN data set tool "
               "(https://github.com/tkarras/progressive_growing_of_gans) or CelebAMask-HQ's "
               "CelebA-HQ-img (https://github.com/switchablenorms/CelebAMask-HQ)"),
    "cifar10": ("<root>/cifar-10-batches-py/ (data_batch_1..5, test_batch), as extracted from "
                "cifar-10-python.tar.gz",
                "CIFAR-10 is published at https://www.cs.toronto.edu/~kriz/cifar.html (or set "
                "data.download=true)"),
    "stl10": ("<root>/stl10_binary/ (train_X.bin, test_X.bin, unlabeled_X.bin), as extracted "
              "from stl10_binary.tar.gz",
              "STL-10 is published at https://cs.stanford.edu/~acoates/stl10/ (or set "
              "data.download=true)"),
    "celeba": (None, "CelebA is published at https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html "
               "(Align&Cropped Images: img_align_celeba.zip; Eval: list_eval_partition.txt); "
               "`st data prepare celeba --from DOWNLOADS --out ROOT` lays them out"),
    "imagenet32": (None, "ImageNet32 is published at https://image-net.org/download-images "
                   "(Downsampled ImageNet 32x32, free account); `st data prepare imagenet32 "
                   "--from DOWNLOADS --out ROOT` lays out the PNG tarballs"),
}


def where_to_find(spec: DataSpec, message: str) -> str:
    """`message` of a failed load, with the absolute root searched, the expected layout (if the
    message lacks it) and where the data set is published."""
    root = spec.data_root
    if root is None:
        return message
    resolved = Path(root).expanduser().resolve()
    parts = [message, f"data.root {root!r} is {resolved}" + (
        "" if Path(root).expanduser().is_absolute()
        else f" (relative paths are read from the working directory {Path.cwd()})")]
    layout, published = SOURCES.get(spec.name, (None, None))
    if layout and layout not in message:
        parts.append(f"expected layout: {layout}")
    if published:
        parts.append(published)
    return "; ".join(parts)


class DataSpec(Component):
    """What every dataset offers: named splits, ``shape``, ``dim``, ``create(split)``."""

    splits: ClassVar[tuple[str, ...]] = ("train", "test")
    is_image: ClassVar[bool] = False  # 8-bit images: `to_uint8` gives pixels, samples are pictures

    def resolved(self) -> DataSpec:
        """This spec with every setting fixed that is otherwise read from the data (a
        checkpoint's recipe then needs no data to rebuild its network)."""
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def zero_centered(self) -> bool:
        """Whether the model sees the data centred on 0 (the nets' input convention)."""
        return True

    def bpd_offset(self) -> float:
        """Added to nats/dim / log 2 for bits/dim of 8-bit data: 0 for data that are not images."""
        return 0.0

    def transform(self, batch: torch.Tensor, generator: torch.Generator | None = None):
        """A stored batch -> the model's float32 input (identity here)."""
        return batch.float()

    def picture(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as uint8 images (B, C, H, W) for a grid."""
        raise NotImplementedError

    def to_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """Model outputs as 8-bit pixels, for data sets with `is_image` (what `st sample` writes)."""
        raise NotImplementedError(f"dataset {self.name!r} does not hold 8-bit images")

    @property
    def data_root(self) -> str | None:
        """The folder the data are read from (named when loading fails); None: no files."""
        return None

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
        try:
            data = self.load(split)
        except UserError as err:
            raise UserError(where_to_find(self, str(err))) from None
        if getattr(self, "in_memory", False) and not isinstance(data, InMemory):
            data = InMemory(decode_all(data))
        return data

    def load(self, split: str) -> Dataset:
        raise NotImplementedError

    @property
    def training_split(self) -> str:
        """The split `st train` learns from."""
        return "train"

    def for_evaluation(self) -> DataSpec:
        """This data set as likelihood evaluation sees it (images: uniform dequantisation, no
        flips); itself for data without such options."""
        return self


class ImageData(DataSpec):
    """Images as uint8 (C, image_size, image_size) tensors read from ``root``."""

    native_channels: ClassVar[int] = 3
    native_size: ClassVar[int | None] = None  # the only image_size allowed, if any
    downloadable: ClassVar[bool] = False

    root: str = "data"
    image_size: PositiveInt = 32
    centered: bool = True
    random_flip: bool = False
    # "none": x = k/255, as the official runs train; "uniform": x = (k + U)/256 (st nll's)
    dequantization: Literal["none", "uniform"] = "none"
    download: bool = False
    in_memory: bool = False  # decode every image file once, at start (fast STF reference batches)
    train_split: str = "train"  # the split `st train` learns from (stl10: train+unlabeled)
    is_image: ClassVar[bool] = True

    @property
    def zero_centered(self) -> bool:
        return self.centered

    @property
    def data_root(self) -> str | None:
        return self.root

    def bpd_offset(self) -> float:
        """Uniformly dequantised 8-bit data: 8 on [0, 1], 7 on [-1, 1] (log2 of the bin width)."""
        return 7.0 if self.centered else 8.0

    @property
    def training_split(self) -> str:
        return self.train_split

    @property
    def root_path(self) -> Path:
        """`root` with `~` as the home folder, expanded where it is read (the recipe keeps the
        text as written, so a checkpoint does not carry one user's home)."""
        return Path(self.root).expanduser()

    @field_validator("train_split")
    @classmethod
    def _known_train_split(cls, split: str) -> str:
        if split not in cls.splits:
            raise ValueError(f"{split!r} is not a split of this data set; valid splits: "
                             f"{', '.join(cls.splits)}")
        return split

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
        return (self.n_channels(), self.image_size, self.image_size)

    def n_channels(self) -> int:
        return self.native_channels

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
        """Inverse of ``transform`` for model outputs, clamped to 0..255: k = round(255 x01)
        for x = k/255 ("none"); k = floor(256 x01) for x = (k + U)/256 ("uniform"), whose
        pixel k covers [k/256, (k+1)/256) (rounding 255 x01 there turned 0 into 1 and 255 into
        254 about half the time)."""
        x01 = (x + 1) / 2 if self.centered else x
        k = (256 * x01).floor() if self.dequantization == "uniform" else (255 * x01).round()
        return k.clamp(0, 255).to(torch.uint8)

    def picture(self, x: torch.Tensor) -> torch.Tensor:
        """Samples as uint8 images (B, C, H, W) for a grid."""
        return self.to_uint8(x)


@DATASETS.register
class Digits(ImageData):
    """scikit-learn's bundled 8x8 digits (no network): upscaled to image_size - 2 padding
    (antialiased bilinear), zero-padded.  train = first 1500, test = the other 297."""

    name: Literal["digits"] = "digits"
    native_channels: ClassVar[int] = 1
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
    """Every png/jpg/jpeg/bmp/webp under root (recursive, sorted): short side resized to
    image_size (bicubic), centre-cropped.  If root/train and root/test exist they are the
    splits; otherwise all images are train.  channels: 3 reads RGB, 1 grayscale, "auto" 1 if
    every image of the folder is grayscale, else 3."""

    name: Literal["folder"] = "folder"
    channels: Literal["auto", 1, 3] = "auto"
    _detected: int | None = PrivateAttr(None)

    def n_channels(self) -> int:
        if self.channels != "auto":
            return self.channels
        if not self.root_path.is_dir():
            return 3  # no data to look at (a recipe read without its data): RGB; training stops
        if self._detected is None:  # every split's images decide, once
            try:
                self._detected = detect_channels(self._paths(self.root_path))
            except UserError as err:
                raise UserError(where_to_find(self, f"data.channels auto: {err}")) from None
        return self._detected

    def resolved(self) -> Folder:
        return self.model_copy(update={"channels": self.n_channels()})

    def _paths(self, root: Path) -> list[Path]:
        if not root.is_dir():
            raise UserError(f"dataset 'folder': image folder {root} does not exist")
        return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())

    def load(self, split: str) -> Dataset:
        root = self.root_path
        if root.is_dir() and (root / "train").is_dir() and (root / "test").is_dir():
            root = root / split
        elif root.is_dir() and split != "train":
            raise UserError(f"dataset 'folder': {root} has no 'train' and 'test' subfolders, "
                            f"so it only has a 'train' split")
        paths = self._paths(root)
        if not paths:
            raise UserError(f"dataset 'folder': no images ({', '.join(IMAGE_EXTENSIONS)}) "
                            f"under {root}")
        for path in paths:  # every header read now: an unreadable file stops a run before it starts
            read_header(path)
        mode = "L" if self.n_channels() == 1 else "RGB"
        return ImageFiles(paths, partial(read_image, size=self.image_size, mode=mode))


def detect_channels(paths: list[Path]) -> int:
    """1 if every image is grayscale (read from the file headers), else 3."""
    for path in paths:
        if read_header(path)[1] not in GRAY_MODES:
            return 3
    return 1 if paths else 3


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
        folder = self.root_path / "img_align_celeba"
        partition = self.root_path / "list_eval_partition.txt"
        if not folder.is_dir():
            raise UserError(f"dataset 'celeba': no folder {folder}; expected layout: "
                            f"{self.layout}.  Automatic download is not supported (torchvision's "
                            f"CelebA downloader is unreliable): extract img_align_celeba.zip "
                            f"into {self.root}")
        if partition.is_file():
            index = str(self.splits.index(split))
            paths = [folder / file for file, part in celeba_partition(partition).items()
                     if part == index]
        elif split == "train":
            paths = sorted(folder.glob("*.jpg"))
        else:
            raise UserError(f"dataset 'celeba': split {split!r} needs {partition} ({self.layout})")
        return ImageFiles(paths, partial(read_image, size=self.image_size, pre_crop=140))


def celeba_partition(path: Path) -> dict[str, str]:
    """list_eval_partition.txt as {file: "0" train | "1" valid | "2" test}, in file order; a
    malformed line, or a file listed twice (it would be in two splits: test images leaking into
    training), is a UserError."""
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    bad = next((r for r in rows if len(r) != 2 or r[1] not in ("0", "1", "2")), None)
    if bad is not None:
        raise UserError(f"{path}: expected lines '000001.jpg 0' (0 train, 1 valid, 2 test), "
                        f"found {' '.join(bad)!r}")
    listed = dict(rows)
    if len(listed) < len(rows):
        seen: set[str] = set()
        twice = next(f for f, _ in rows if f in seen or seen.add(f))
        raise UserError(f"{path} lists {twice} more than once ({len(rows) - len(listed)} repeated "
                        "line(s)): each image belongs to one split")
    return listed


@DATASETS.register
class ImageNet32(ImageData):
    """Downsampled ImageNet 32x32.  source "png" (default): van den Oord et al.'s release, the
    one the likelihood literature evaluates on, as PNG folders decoded lazily; source "npz":
    Chrabaszcz et al.'s release (a different downsampling, hence different NLLs), rows of 3072
    uint8 (the R, G then B plane) copied batch by batch into one preallocated tensor, so that
    the train set is never held twice.  Splits train and test (the validation images)."""

    name: Literal["imagenet32"] = "imagenet32"
    native_size: ClassVar[int | None] = 32
    source: Literal["png", "npz"] = "png"
    layouts: ClassVar[dict[str, str]] = {
        "png": "<root>/train_32x32/*.png and <root>/valid_32x32/*.png (32x32 RGB)",
        "npz": ("<root>/Imagenet32_train_npz/train_data_batch_{1..10}.npz and "
                "<root>/Imagenet32_val_npz/val_data.npz, each with key 'data' "
                "of shape (N, 3072) uint8")}

    def load(self, split: str) -> Dataset:
        return self._load_png(split) if self.source == "png" else self._load_npz(split)

    def _load_png(self, split: str) -> Dataset:
        folder = self.root_path / ("train_32x32" if split == "train" else "valid_32x32")
        paths = sorted(folder.glob("*.png")) if folder.is_dir() else []
        if not paths:
            raise UserError(f"dataset 'imagenet32': no PNG images in {folder}; expected layout "
                            f"(data.source png): {self.layouts['png']}; for the npz release set "
                            f"data.source=npz")
        return ImageFiles(paths, partial(read_png32, size=self.native_size))

    def _load_npz(self, split: str) -> Dataset:
        files = ([f"Imagenet32_train_npz/train_data_batch_{i}.npz" for i in range(1, 11)]
                 if split == "train" else ["Imagenet32_val_npz/val_data.npz"])
        paths = [self.root_path / f for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"dataset 'imagenet32': missing {', '.join(missing)}; "
                            f"expected layout (data.source npz): {self.layouts['npz']}")
        counts = [npz_rows(p) for p in paths]
        out = torch.empty(sum(counts), 3, 32, 32, dtype=torch.uint8)
        start = 0
        for path, n in zip(paths, counts):
            out[start:start + n] = torch.from_numpy(self._rows(path)).view(-1, 3, 32, 32)
            start += n
        return InMemory(out)

    def _rows(self, path: Path) -> np.ndarray:
        with np.load(path, allow_pickle=False) as z:
            data = z["data"] if "data" in z else None
        if data is None or data.ndim != 2 or data.shape[1] != 3072:
            raise UserError(f"dataset 'imagenet32': {path} has no 'data' array of shape (N, 3072)")
        return data.astype(np.uint8, copy=False)


def npz_rows(path: Path) -> int:
    """Rows of the (N, 3072) array 'data' of an npz, read from its header (no data loaded)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
            major, _ = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if major == 1
                    else np.lib.format.read_array_header_2_0)
            shape, _, _ = read(f)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        raise UserError(f"dataset 'imagenet32': {path} has no 'data' array of shape "
                        f"(N, 3072)") from None
    if len(shape) != 2 or shape[1] != 3072:
        raise UserError(f"dataset 'imagenet32': {path} has no 'data' array of shape (N, 3072)")
    return shape[0]


def read_png32(path: Path, size: int) -> torch.Tensor:
    """An RGB image of exactly size x size pixels as uint8 (3, size, size), never resampled."""
    array = read_pixels(path, "RGB")
    if array.shape[:2] != (size, size):
        raise UserError(f"dataset 'imagenet32': {path} is {array.shape[1]}x{array.shape[0]}, "
                        f"expected {size}x{size}")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


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

    def picture(self, x: torch.Tensor, size: int = 128, extent: float = 3.0) -> torch.Tensor:
        """Samples as one uint8 image (1, 1, size, size): their 2-D histogram on
        [-extent, extent]^2 (y up), with square-root contrast."""
        ij = ((x.float().cpu() + extent) / (2 * extent) * size).long()
        ij = ij[((ij >= 0) & (ij < size)).all(1)]
        counts = torch.bincount((size - 1 - ij[:, 1]) * size + ij[:, 0], minlength=size * size)
        img = counts.float().sqrt()
        img = (255 * img / img.max().clamp(min=1)).round().to(torch.uint8)
        return img.view(1, 1, size, size)
