"""`st fid` and `st fid-ref`: image sets in, FID / IS / KID / PRC out, reference statistics.

An image set — samples or reference — is a folder of PNG/JPG images (recursive), an ``.npz``
of uint8 images, a recipe (its data section's split) or a torch-fidelity dataset name; each
becomes a dataset of uint8 (3, H, W) tensors, checked before any work (empty, mixed sizes,
unreadable files; grayscale is converted to 3 channels, with a warning).

Reference statistics (the FID mean and covariance, and the pool features that KID and PRC
need) are written with safetensors by ``st fid-ref``, and cached under the cache folder for
any other reference.  Their metadata records the source, a sha256 of the pixels the
extractor saw, the extractor and the resize mode; a file is never reused for another source,
extractor or resize mode.  Published statistics (an ``.npz`` with arrays ``mu`` and
``sigma``, as EDM, ADM and score_sde release them) serve as an FID reference too.

The resize mode (``--resize``, else a checkpoint recipe's ``eval.fid.resize``, else "tf")
decides how images reach the extractor's 299x299 input: "tf" leaves it to the network's
TF-compatible bilinear resize, "clean" resizes with PIL bicubic first (clean-fid's protocol).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from rich.table import Table
from rich.text import Text
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from stcli.components.data import InMemory
from stcli.components.metrics import (
    INCEPTION,
    Metric,
    Reference,
    Settings,
    build_extractor,
    extract,
    inception_weights,
    sha256,
)
from stcli.infra import checkpoint
from stcli.infra.console import StepProgress, console, info, warn
from stcli.infra.errors import UserError
from stcli.infra.images import GRAY_MODES, read_header, read_pixels
from stcli.infra.outputs import json_text, write_result

SUFFIXES = (".png", ".jpg", ".jpeg")
GRID = "grid.png"  # `st sample` writes it beside its images: never measured
STATS_KIND = "st-fid-reference/1"
TRAINING_ONLY = ("random_flip", "dequantization", "centered", "download", "train_split")


@dataclass
class ImageSet:
    """Images as uint8 (3, H, W) tensors, and what they are."""

    dataset: Dataset
    source: dict  # JSON: {"kind": "folder" | "npz" | "recipe" | "torch-fidelity", ...}
    label: str  # short name for messages and cache files


class FileImages(Dataset):
    """Image files read as RGB uint8 (3, H, W) by stcli.infra.images.read_pixels; an unreadable file
    is a UserError naming it."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        array = read_pixels(self.paths[i], "RGB")
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class RGB(Dataset):
    """A uint8 image dataset with one channel repeated to three; read errors as UserErrors."""

    def __init__(self, dataset: Dataset, label: str):
        self.dataset, self.label = dataset, label

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            x = self.dataset[i]
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {i} of {self.label}: {err}") from None
        return x.expand(3, *x.shape[1:]) if x.shape[0] == 1 else x


# ---- image sets -------------------------------------------------------------------------------

def from_folder(root: Path) -> ImageSet:
    """Every PNG/JPG under root (recursive, sorted), except root/grid.png."""
    paths = sorted(p for p in root.rglob("*")
                   if p.suffix.lower() in SUFFIXES and p.is_file() and p != root / GRID)
    if not paths:
        raise UserError(f"no images ({', '.join(SUFFIXES)}) under {root}")
    _check_headers(root, paths)
    return ImageSet(FileImages(paths), {"kind": "folder", "path": str(root.resolve())},
                    root.resolve().name)


def _check_headers(root: Path, paths: list[Path]) -> None:
    """One size for all images (upright, as read), every header readable and within the pixel
    limit; grayscale images are reported."""
    sizes: dict[tuple[int, int], Path] = {}
    gray = 0
    for path in paths:
        size, mode = read_header(path)
        sizes.setdefault(size, path)
        gray += mode in GRAY_MODES
    if len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise UserError(f"images under {root} differ in size: {p1} is {s1[0]}x{s1[1]}, "
                        f"{p2} is {s2[0]}x{s2[1]}; resize them to one size first")
    if gray:
        warn(f"{gray} of {len(paths)} images under {root} are grayscale: converted to 3 channels")


def from_npz(path: Path) -> ImageSet:
    """Array 'images' (else the first) of an npz: uint8 (N, H, W, C) or (N, C, H, W)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            key = "images" if "images" in z.files else (z.files or [None])[0]
            array = z[key] if key else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if array is None or array.dtype != np.uint8 or array.ndim != 4 or not (
            {array.shape[1], array.shape[3]} & {1, 3}):
        found = "no arrays" if array is None else f"{array.dtype} {tuple(array.shape)} in {key!r}"
        raise UserError(f"{path}: expected uint8 images (N, H, W, C) or (N, C, H, W) with "
                        f"C = 1 or 3, found {found}")
    images = torch.from_numpy(array)
    images = images.permute(0, 3, 1, 2) if array.shape[3] in (1, 3) else images
    if len(images) == 0:
        raise UserError(f"{path}: array {key!r} holds no images")
    if images.shape[1] == 1:
        warn(f"{path}: grayscale images converted to 3 channels")
    source = {"kind": "npz", "path": str(path.resolve()), "key": key}
    return ImageSet(RGB(InMemory(images.contiguous()), str(path)), source, path.stem)


def from_recipe(path: Path, split: str) -> ImageSet:
    """The uint8 images of a recipe's data section, split ``split``."""
    from stcli.components.recipe import load_recipe

    return from_data(load_recipe(path).data, split, f"recipe {path}")


def from_data(data, split: str, where: str) -> ImageSet:
    """The uint8 images of a data spec's split (``where``: the recipe it comes from)."""
    from stcli.components.data import ImageData

    if not isinstance(data, ImageData):
        raise UserError(f"{where}: dataset {data.name!r} holds no images")
    dataset = data.create(split)
    if len(dataset) == 0:
        raise UserError(f"{where}: split {split!r} of {data.name!r} holds no images")
    if data.n_channels() == 1:
        warn(f"{data.name} images are grayscale: converted to 3 channels")
    source = {"kind": "recipe", "recipe": where, "data": data.model_dump(mode="json"),
              "split": split}
    return ImageSet(RGB(dataset, f"{data.name} ({split})"), source, f"{data.name}-{split}")


def from_registered(name: str, cache_dir: Path) -> ImageSet:
    """A torch-fidelity dataset (cifar10-train, ...), downloaded once into <cache>/datasets."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    root = cache_dir / "datasets"
    root.mkdir(parents=True, exist_ok=True)
    try:
        dataset = DATASETS_REGISTRY[name](str(root), True)
    except (OSError, RuntimeError) as err:
        raise UserError(f"cannot load or download torch-fidelity's dataset {name!r} into {root} "
                        f"({err}); without network, place its files there (for cifar10-*: "
                        f"the extracted cifar-10-batches-py folder)") from None
    return ImageSet(RGB(dataset, name), {"kind": "torch-fidelity", "name": name}, name)


def open_images(arg: str, split: str, settings: Settings) -> ImageSet:
    """A folder, .npz, recipe or torch-fidelity dataset name as an ImageSet."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    path = Path(arg).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        return from_folder(path)
    if path.is_file() and suffix == ".npz":
        return from_npz(path)
    if path.is_file() and suffix in (".yaml", ".yml"):
        return from_recipe(path, split)
    if arg in DATASETS_REGISTRY:
        return from_registered(arg, settings.cache_dir)
    problem = "is not a folder, .npz or recipe" if path.exists() else "does not exist"
    raise UserError(f"{arg} {problem}; images come from a folder of PNG/JPG, an .npz, a recipe "
                    f"(.yaml) or a torch-fidelity dataset ({', '.join(DATASETS_REGISTRY)})")


def content_hash(images: ImageSet) -> str:
    """sha256 of every image's shape and pixels, in order: exactly what the extractor sees."""
    digest, n = hashlib.sha256(), len(images.dataset)
    with StepProgress(f"hashing {images.label}", n) as progress:
        for i in range(n):
            x = images.dataset[i]
            digest.update(repr(tuple(x.shape)).encode())
            digest.update(x.contiguous().numpy().tobytes())
            if (i + 1) % 512 == 0 or i + 1 == n:
                progress.update(i + 1, {})
    return digest.hexdigest()


# ---- sources ----------------------------------------------------------------------------------

def data_identity(data: dict) -> dict:
    """The fields of a recipe data section that decide its images: not the training-only
    ones, and not root (a location) unless the dataset is a plain folder."""
    drop = TRAINING_ONLY + (() if data.get("name") == "folder" else ("root",))
    return {k: v for k, v in data.items() if k not in drop}


def source_identity(source: dict) -> dict:
    """What makes two sources the same images (a recipe's file name does not)."""
    if source["kind"] == "recipe":
        return {"kind": "recipe", "data": data_identity(source["data"]), "split": source["split"]}
    return source


def describe_data(data: dict) -> str:
    fields = ", ".join(f"{k}={v}" for k, v in data_identity(data).items() if k != "name")
    return f"dataset {data['name']} ({fields})"


def describe(source: dict) -> str:
    if source["kind"] == "recipe":
        return f"{describe_data(source['data'])}, split {source['split']}"
    if source["kind"] == "torch-fidelity":
        return f"torch-fidelity dataset {source['name']}"
    return f"{source['kind']} {source['path']}"


# ---- reference statistics ---------------------------------------------------------------------

def _decode(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value


def read_metadata(path: Path) -> dict:
    """The decoded metadata of a safetensors file (a clear UserError if it is not one)."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is not a readable safetensors file ({err})") from None
    return {k: _decode(v) for k, v in metadata.items()}


def load_reference(path: Path, settings: Settings) -> Reference:
    """Reference statistics written by `st fid-ref`, for the extractor of ``settings``."""
    meta = read_metadata(path)
    if meta.get("kind") != STATS_KIND:
        what = "an st checkpoint" if "recipe" in meta else "not written by `st fid-ref`"
        raise UserError(f"{path} is {what}: it holds no reference statistics")
    if meta["feature_extractor"] != settings.extractor:
        raise UserError(f"{path} was computed with the feature extractor "
                        f"{meta['feature_extractor']!r}, this run uses {settings.extractor!r} "
                        f"(--feature-extractor): their distances are not comparable")
    if meta.get("resize", "tf") != settings.resize_mode:
        raise UserError(f"{path} was computed with resize mode {meta.get('resize', 'tf')!r}, "
                        f"this run uses {settings.resize_mode!r} (--resize or the recipe's "
                        f"eval.fid.resize): their distances are not comparable")
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in ("mu", "sigma", "features")}
    return Reference(t["mu"].numpy(), t["sigma"].numpy(), t["features"], meta)


def is_stats_npz(path: Path) -> bool:
    """True for an .npz holding arrays 'mu' and 'sigma' (published FID statistics)."""
    if path.suffix.lower() != ".npz" or not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"mu", "sigma"} <= set(z.files)
    except (OSError, ValueError, zipfile.BadZipFile):
        return False


def load_stats_npz(path: Path, settings: Settings) -> Reference:
    """Published statistics: 'mu' (D,) and 'sigma' (D, D) of the extractor's pool layer.  No
    features come with them (FID only), and how they were computed is not recorded: they must
    be of the same extractor and resize protocol as this run."""
    try:
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UserError(f"cannot read statistics {path}: {err}") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise UserError(f"{path}: expected mu (D,) and sigma (D, D), found mu {mu.shape} and "
                        f"sigma {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{path}: mu or sigma holds non-finite values")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    warn(f"{path}: published statistics record neither extractor nor resize protocol; they "
         f"are used as {settings.extractor} features with resize mode {settings.resize_mode!r}")
    meta = {"kind": "stats-npz", "source": {"kind": "stats-npz", "path": str(path.resolve())},
            "content_hash": digest, "feature_extractor": settings.extractor,
            "resize": settings.resize_mode, "n": None, "shape": None}
    return Reference(mu, sigma, None, meta)


def save_reference(path: Path, ref: Reference) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"mu": torch.from_numpy(np.asarray(ref.mu)), "sigma": torch.from_numpy(ref.sigma),
               "features": ref.features}
    checkpoint.save(path, tensors, ref.meta)


def compute_reference(images: ImageSet, digest: str, extractor, settings: Settings) -> Reference:
    features = extract(images.dataset, extractor, settings, images.label)["pool"]
    meta = {"kind": STATS_KIND, "source": images.source, "content_hash": digest,
            "feature_extractor": settings.extractor, "resize": settings.resize_mode,
            "layer": settings.layers()["pool"],
            "n": len(features), "shape": list(images.dataset[0].shape),
            "torch_fidelity": torch_fidelity.__version__}
    return Reference.from_features(features, meta)


def cached_reference(images: ImageSet, extractor, settings: Settings) -> Reference:
    """Reference statistics of an image set, from <cache>/reference when its pixels were seen."""
    digest = content_hash(images)
    resize = "" if settings.resize_mode == "tf" else f"/{settings.resize_mode}"  # old keys kept
    key = hashlib.sha256(
        f"{digest}/{settings.extractor}/{settings.layers()['pool']}{resize}".encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", images.label)[:40]
    name = f"{slug}-{settings.extractor}-{key.hexdigest()[:16]}.safetensors"
    path = settings.cache_dir / "reference" / name
    if path.is_file():
        info(f"reference statistics of {images.label}: from the cache {path}")
        return load_reference(path, settings)
    ref = compute_reference(images, digest, extractor, settings)
    save_reference(path, ref)
    info(f"reference statistics of {images.label}: computed and cached in {path}")
    return ref


def _stats_metadata(out: Path) -> dict:
    """Metadata of an existing --out that holds reference statistics; a refusal otherwise (even
    with --overwrite, which replaces statistics, never another file)."""
    meta = read_metadata(out)
    if meta.get("kind") != STATS_KIND:
        what = "an st checkpoint" if "recipe" in meta else "a file not written by `st fid-ref`"
        raise UserError(f"{out} exists and is {what}, not reference statistics; choose another --out")
    return meta


def _existing_stats(out: Path, images: ImageSet, settings: Settings) -> dict:
    """Metadata of an existing --out for the same source and extractor; a refusal otherwise."""
    meta = _stats_metadata(out)
    if (source_identity(meta["source"]) != source_identity(images.source)
            or meta["feature_extractor"] != settings.extractor
            or meta.get("resize", "tf") != settings.resize_mode):
        raise UserError(f"{out} holds statistics of {describe(meta['source'])} "
                        f"({meta['feature_extractor']}, resize {meta.get('resize', 'tf')}), not "
                        f"of {describe(images.source)} ({settings.extractor}, resize "
                        f"{settings.resize_mode}): refusing to reuse it; choose another --out, "
                        f"or pass --overwrite to replace it")
    return meta


def fid_ref(arg: str, out: Path, *, split: str | None, settings: Settings,
            overwrite: bool) -> Reference:
    """`st fid-ref`: compute reference statistics once (kept if ``out`` is up to date).  The
    resize mode defaults to a recipe's eval.fid.resize; ``split`` (default train) applies to a
    recipe only."""
    path = Path(arg).expanduser()
    is_recipe = path.is_file() and path.suffix.lower() in (".yaml", ".yml")
    if split is not None and not is_recipe:
        raise UserError(f"--split applies to a recipe's dataset; {arg} is used whole")
    settings = settings.with_resize(_ref_resize(arg))
    split = split or "train"
    if settings.extractor == INCEPTION:
        inception_weights(settings)  # missing weights: said before the images are hashed
    images = open_images(arg, split, settings)
    if len(images.dataset) < 2:
        raise UserError(f"reference statistics need at least 2 images, {images.label} has "
                        f"{len(images.dataset)}")
    if out.exists() and overwrite:
        _stats_metadata(out)
    old = _existing_stats(out, images, settings) if out.exists() and not overwrite else None
    digest = content_hash(images)
    if old and old.get("content_hash") == digest:
        info(f"{out} is up to date ({describe(images.source)}, content hash {digest[:12]})")
        return load_reference(out, settings)
    if old:
        info(f"the images changed since {out} was written; recomputing")
    ref = compute_reference(images, digest, build_extractor(settings, ("pool",)), settings)
    save_reference(out, ref)
    info(f"wrote {out}: {len(ref.features)} images of {describe(images.source)}, "
         f"{settings.extractor} features ({ref.features.shape[1]}-d), content hash {digest[:12]}")
    return ref


# ---- st fid -----------------------------------------------------------------------------------

def _checkpoint_recipe(path: Path):
    """The recipe inside an st checkpoint (SAMPLES given as .safetensors)."""
    from stcli.components.recipe import parse_recipe

    meta = read_metadata(path)
    if meta.get("kind") == STATS_KIND:
        raise UserError(f"{path} holds reference statistics: pass it as --ref; SAMPLES is a "
                        f"folder, an .npz or a checkpoint")
    if meta.get("format") != checkpoint.FORMAT or "recipe" not in meta:
        raise UserError(f"{path} is not an st checkpoint")
    return parse_recipe(meta["recipe"], f"the recipe inside {path}")


def _check_same_data(ref: Reference, recipe, ckpt: Path) -> None:
    """Refuse statistics of a recipe's data other than the data the checkpoint learned."""
    source = ref.meta["source"]
    if source["kind"] != "recipe":
        return
    trained = recipe.data.model_dump(mode="json")
    if data_identity(source["data"]) != data_identity(trained):
        raise UserError(f"the reference statistics are of {describe(source)}, but {ckpt} "
                        f"was trained on {describe_data(trained)}: compute statistics of its "
                        f"data with `st fid-ref`")


@contextmanager
def _sample_folder(keep: Path | None) -> Iterator[Path]:
    if keep:
        yield keep
        return
    with tempfile.TemporaryDirectory(prefix="st-fid-") as tmp:
        yield Path(tmp) / "samples"


def _measure(images: ImageSet, ref: Reference, metrics: list[Metric], extractor,
             settings: Settings) -> dict[str, float]:
    shape = list(images.dataset[0].shape)
    if ref.meta["shape"] and shape != ref.meta["shape"]:
        warn(f"samples are {shape[1]}x{shape[2]}, reference images {ref.meta['shape'][1]}x"
             f"{ref.meta['shape'][2]}: both are resized by the feature extractor")
    features = extract(images.dataset, extractor, settings, images.label)
    if features["pool"].shape[1] != len(ref.mu):
        raise UserError(f"the reference statistics are {len(ref.mu)}-d, the {settings.extractor} "
                        f"features {features['pool'].shape[1]}-d: they are of another extractor")
    results: dict[str, float] = {}
    for metric in metrics:
        results.update(metric.compute(features, ref))
    return results


def run_fid(samples: str, ref_arg: str | None, *, metrics: list[Metric], settings: Settings,
            n: int | None = None, samples_dir: Path | None = None, json_path: Path | None = None,
            seed: int | None = None, weights: str | None = None,
            sampler: str | None = None) -> dict:
    """`st fid`: measure SAMPLES (images, or a checkpoint sampled first) against a reference.
    Options of the drawing (n, samples_dir, seed, weights, sampler) apply to a checkpoint only;
    None means unset (seed 0, EMA weights, the recipe's sampler and eval.fid.n)."""
    if weights not in (None, "ema", "raw"):
        raise UserError(f"--weights must be ema or raw, got {weights!r}")
    path = Path(samples).expanduser()
    recipe = _checkpoint_recipe(path) if _is_checkpoint(path) else None
    if recipe is None:
        given = [flag for flag, value in (("-n", n), ("--samples-dir", samples_dir), ("--seed", seed),
                                          ("--weights", weights), ("--sampler", sampler))
                 if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to a checkpoint only; {samples} is a set "
                            "of images, measured as it is")
    settings = settings.with_resize(recipe.eval.fid.resize if recipe else _ref_resize(ref_arg))
    ref = _reference(ref_arg or (recipe.eval.fid.ref if recipe else None), settings, recipe)
    if recipe and isinstance(ref, Reference):
        _check_same_data(ref, recipe, path)
    if settings.extractor == INCEPTION:
        inception_weights(settings)  # missing weights: said before the images are read or hashed
    images = None if recipe else open_images(samples, "train", settings)
    count = len(images.dataset) if images else (n or recipe.eval.fid.n)
    if isinstance(ref, Reference) and ref.features is None:
        others = [m.name for m in metrics if m.name != "fid"]
        if others:
            raise UserError(f"{', '.join(others).upper()} need the reference's features; "
                            f"published mu/sigma statistics serve FID only")
        n_ref = count  # unknown for published statistics
    else:
        n_ref = len(ref.features) if isinstance(ref, Reference) else len(ref.dataset)
    for metric in metrics:
        metric.check(count, n_ref)
    extractor = build_extractor(settings, tuple({"pool"} | {m.role for m in metrics}))
    if isinstance(ref, ImageSet):
        ref = cached_reference(ref, extractor, settings)
    if images:
        provenance = _folder_manifest(Path(samples))
        _check_complete(samples, len(images.dataset), provenance)
        results = _measure(images, ref, metrics, extractor, settings)
    else:
        results, provenance = _sample_and_measure(path, count, ref, metrics, extractor, settings,
                                                  samples_dir, seed or 0, weights or "ema", sampler)
    report = {"samples": samples, "ref": ref_arg or recipe.eval.fid.ref, "n_samples": count,
              "n_ref": None if ref.features is None else len(ref.features),
              "ref_content_hash": ref.meta["content_hash"],
              "feature_extractor": settings.extractor, "resize": settings.resize_mode,
              "metrics": results, "samples_provenance": provenance,
              "ref_identity": {k: ref.meta.get(k) for k in REF_IDENTITY},
              "extractor_identity": extractor_identity(settings)}
    _print_table(report, results)
    if json_path:
        _write_json(json_path, report)
    return report


REF_IDENTITY = ("kind", "source", "content_hash", "feature_extractor", "resize", "n", "shape",
                "torch_fidelity")


def extractor_identity(settings: Settings) -> dict:
    """Which features were compared: extractor, layer, weights (sha256 of the file) and versions."""
    weights = inception_weights(settings) if settings.extractor == INCEPTION else None
    return {"name": settings.extractor, "layer": settings.layers()["pool"],
            "weights_sha256": sha256(weights) if weights else None,
            "resize": settings.resize_mode, "torch_fidelity": torch_fidelity.__version__}


def _is_checkpoint(path: Path) -> bool:
    """A .safetensors file, or an st checkpoint or export under another suffix (.st, ...)."""
    if path.suffix == ".safetensors":
        return True
    if not path.is_file() or path.suffix.lower() in (".npz", ".yaml", ".yml"):
        return False
    try:
        return "recipe" in read_metadata(path)
    except UserError:
        return False


def _ref_resize(ref_arg: str | None) -> str | None:
    """The resize mode a reference carries, for images measured without a checkpoint: a recipe's
    eval.fid.resize, or the mode `st fid-ref` computed the statistics with."""
    path = Path(ref_arg).expanduser() if ref_arg else None
    if path is None or not path.is_file():
        return None
    if path.suffix.lower() in (".yaml", ".yml"):
        from stcli.components.recipe import load_recipe

        return load_recipe(path).eval.fid.resize
    if path.suffix == ".safetensors":
        meta = read_metadata(path)
        return meta.get("resize", "tf") if meta.get("kind") == STATS_KIND else None
    return None


def _check_complete(samples: str, count: int, manifest: dict | None) -> None:
    """A folder `st sample` was writing holds every image its manifest promises."""
    if manifest and manifest.get("count") not in (None, count):
        raise UserError(f"{samples} holds {count} images but its manifest says {manifest['count']} "
                        f"were drawn: the sampling did not finish; complete it with `st sample CKPT "
                        f"-n {manifest['count']} --out {samples}` (it resumes)")


def _folder_manifest(path: Path) -> dict | None:
    """The `st sample` manifest of a folder of samples (None for other image sets)."""
    from stcli.jobs.sample import read_manifest

    return read_manifest(path) if path.is_dir() else None


def _reference(arg: str | None, settings: Settings, recipe) -> Reference | ImageSet:
    """A statistics file, loaded; any other reference as images (statistics computed later).
    For a checkpoint, NAME-SPLIT that is neither a path nor a torch-fidelity dataset (the
    recipes' eval.fid.ref: celeba-train, ...) means split SPLIT of its own data section."""
    from torch_fidelity.registry import DATASETS_REGISTRY

    if not arg:
        raise UserError("--ref is required (and a checkpoint's recipe sets no eval.fid.ref)")
    path = Path(arg).expanduser()
    if path.is_file() and _is_checkpoint(path):  # statistics (.safetensors) or a checkpoint
        return load_reference(path, settings)
    if is_stats_npz(path):
        return load_stats_npz(path, settings)
    name, _, split = arg.rpartition("-")
    if recipe and not path.exists() and arg not in DATASETS_REGISTRY and split in recipe.data.splits:
        if name != recipe.data.name and arg != recipe.eval.fid.ref:
            own = ", ".join(f"{recipe.data.name}-{s}" for s in recipe.data.splits)
            raise UserError(f"--ref {arg}: {name!r} is not the checkpoint's data "
                            f"({recipe.data.name!r}: {own}) nor a torch-fidelity dataset "
                            f"({', '.join(DATASETS_REGISTRY)}), a folder, an .npz or statistics")
        info(f"reference {arg}: split {split!r} of the checkpoint's data ({recipe.data.name})")
        return from_data(recipe.data, split, "the checkpoint's recipe")
    return open_images(arg, "train", settings)


def _sample_and_measure(ckpt: Path, count: int, ref: Reference, metrics: list[Metric],
                        extractor, settings: Settings, samples_dir: Path | None, seed: int,
                        weights: str, sampler: str | None) -> tuple[dict[str, float], dict]:
    """Draw ``count`` samples with `st sample`'s machinery (a kept --samples-dir made otherwise
    is refused by its manifest), then measure them; the results and the samples' manifest."""
    from stcli.jobs.sample import generate, read_manifest

    with _sample_folder(samples_dir) as out:
        generate(ckpt, count, out, sampler={"name": sampler} if sampler else None, seed=seed,
                 batch_size=settings.batch_size, weights=weights, device=settings.device)
        images = from_folder(out)
        if len(images.dataset) != count:
            raise UserError(f"{out} holds {len(images.dataset)} images, expected {count}: "
                            f"use a new or empty --samples-dir")
        return _measure(images, ref, metrics, extractor, settings), read_manifest(out)


ROWS = (("FID", "fid", None), ("IS", "isc_mean", "isc_std"), ("KID", "kid_mean", "kid_std"),
        ("precision", "precision", None), ("recall", "recall", None), ("F-score", "f_score", None))


def _print_table(report: dict, results: dict) -> None:
    n_ref = "statistics" if report["n_ref"] is None else report["n_ref"]
    title = (f"{report['n_samples']} samples of {report['samples']} vs {n_ref} of "
             f"{report['ref']} ({report['feature_extractor']}, resize {report['resize']})")
    table = Table(title=Text(title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for label, key, std in ROWS:
        if key in results:
            table.add_row(label, f"{results[key]:.6g}" + (f" ± {results[std]:.3g}" if std else ""))
    console.print(table)


def _write_json(path: Path, data: dict) -> None:
    write_result(path, json_text(data, indent=2), "result")
