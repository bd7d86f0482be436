"""FID, IS, KID and precision/recall through torch-fidelity, and the feature extractors.

The metric math is torch-fidelity's own (``fid_statistics_to_metric``, ``kid_features_to_metric``,
...), so numbers match its reference implementation; this module adds what the command needs
around it: one feature extractor for every metric, chosen by name and built offline-capable
(the Inception weights come from a local file when there is no network), a feature loop that
reports progress through the console, and one registry entry per metric (``METRICS``) that
checks sample counts before any work is done.

Layers: FID, KID and PRC use the extractor's FID layer ("pool"; Inception's 2048-d pool3),
IS uses its IS layer ("logits").  Unlike torch-fidelity's default, PRC therefore runs on
Inception features rather than VGG-16, so that one weights file serves every metric.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch.utils.data import DataLoader, Dataset
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from stcli.infra.console import StepProgress, warn
from stcli.infra.errors import UserError
from stcli.infra.registry import METRICS, Component

INCEPTION = "inception-v3-compat"
TEST_EXTRACTOR = "st-random-64"
WEIGHTS_URL = URL_INCEPTION_V3
WEIGHTS_FILE = URL_INCEPTION_V3.rsplit("/", 1)[-1]
# The published file's SHA-256 begins with the hex tag of its name (torch hub's convention).
WEIGHTS_SHA256_PREFIX = WEIGHTS_FILE.rsplit("-", 1)[-1].split(".")[0]
DEFAULT_CACHE = Path("~/.cache/st/fidelity")


class SmallFeatures(FeatureExtractorBase):
    """Base of small extractors registered with torch-fidelity: subclasses define
    ``pool(x)`` (uint8 (B, C, H, W) -> (B, 64)) and ``logits(pool)`` (-> (B, 10)); features
    "64" (FID, KID, PRC) and "logits" (IS)."""

    @staticmethod
    def get_provided_features_list():
        return "64", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits" if metric == "isc" else "64"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

    def forward(self, x):
        pool = self.pool(x)
        features = {"64": pool, "logits": self.logits(pool)}
        return tuple(features[k] for k in self.features_list)


class RandomFeatures(SmallFeatures):
    """A tiny fixed random network for tests: no download, deterministic, fast on a CPU.

    uint8 (B, 3, H, W) -> resized to 16x16 -> two random 3x3 convolutions (stride 2, ReLU)
    -> global average pool: 64 features ("64"), and 10 random linear logits of them
    ("logits").  Its numbers mean nothing outside tests.
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("w1", torch.randn(32, 3, 3, 3, generator=g) / 27**0.5)
        self.register_buffer("w2", torch.randn(64, 32, 3, 3, generator=g) / 288**0.5)
        self.register_buffer("head", torch.randn(10, 64, generator=g))

    def pool(self, x):
        x = F.interpolate(x.float() / 127.5 - 1, size=(16, 16), mode="bilinear")
        h = F.relu(F.conv2d(x, self.w1, stride=2, padding=1))
        return F.relu(F.conv2d(h, self.w2, stride=2, padding=1)).mean((2, 3))

    def logits(self, pool):
        return pool @ self.head.T


if TEST_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(TEST_EXTRACTOR, RandomFeatures)


# How images reach the extractor's input size (299x299 for Inception): "tf", torch-fidelity's
# TF1-compatible bilinear resize inside the network (the TF-Inception protocol); "clean", PIL
# bicubic with antialiasing to 299x299 first (clean-fid's resize, Parmar et al. 2022), the
# 299x299 result then passing the network's resize unchanged.
RESIZE_MODES = ("tf", "clean")
CLEAN_SIZE = 299


def clean_resize(image: torch.Tensor, size: int = CLEAN_SIZE) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, size, size) as clean-fid resizes: each channel a float
    image resized by PIL's bicubic filter (whose kernel widens by the scale factor when
    shrinking: antialiasing), clipped to [0, 255]; then rounded, since torch-fidelity's
    Inception takes uint8 (at most 0.5 from clean-fid's float pixels).  PIL's own uint8 path
    is not used: it differs from the float one by up to ~12 levels at the image border."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(c.numpy().astype(np.float32), mode="F")
                           .resize((size, size), Image.BICUBIC)) for c in image]
    out = np.rint(np.clip(np.stack(channels), 0, 255)).astype(np.uint8)
    return torch.from_numpy(out)


class CleanResized(Dataset):
    """A uint8 image dataset seen through ``clean_resize``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> torch.Tensor:
        return clean_resize(self.dataset[i])


@dataclass(frozen=True)
class Settings:
    """How features are computed: extractor, device, batch size, weights file, cache folder."""

    extractor: str = INCEPTION
    device: str = "auto"
    batch_size: int = 64
    weights: str | None = None  # a local copy of the Inception weights (WEIGHTS_FILE)
    cache_dir: Path = DEFAULT_CACHE
    resize: str | None = None  # "tf" | "clean" (see RESIZE_MODES); None: "tf" unless a recipe says

    @property
    def resize_mode(self) -> str:
        mode = self.resize or "tf"
        if mode not in RESIZE_MODES:
            raise UserError(f"--resize must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
        return mode

    def with_resize(self, default: str | None) -> Settings:
        """These settings with the resize mode fixed: --resize, else ``default``, else "tf"."""
        return replace(self, resize=self.resize or default or "tf").checked()

    def checked(self) -> Settings:
        self.resize_mode  # noqa: B018  (raises the UserError of an unknown mode)
        return self

    @property
    def torch_device(self) -> str:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available; use --device cpu")
        return self.device

    def layers(self) -> dict[str, str]:
        """{"pool": layer of FID/KID/PRC, "logits": layer of IS} of the extractor."""
        if self.extractor not in FEATURE_EXTRACTORS_REGISTRY:  # ours and any registered one
            raise UserError(f"unknown feature extractor {self.extractor!r}; available: "
                            f"{', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}")
        cls = FEATURE_EXTRACTORS_REGISTRY[self.extractor]
        return {role: cls.get_default_feature_layer_for_metric(metric)
                for role, metric in (("pool", "fid"), ("logits", "isc"))}


def _download(url: str, target: Path) -> None:
    """Fetch ``url`` to ``target`` through a temporary file (a stalled connection times out)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def inception_weights(settings: Settings) -> Path:
    """The local Inception weights file: --inception-weights / ST_INCEPTION_WEIGHTS, else
    <cache>/WEIGHTS_FILE or torch hub's copy, else downloaded once into <cache>."""
    hint = (f"torch-fidelity's Inception weights {WEIGHTS_FILE} (from {WEIGHTS_URL})")
    if settings.weights:
        path = Path(settings.weights).expanduser()
        if not path.is_file():
            raise UserError(f"--inception-weights / ST_INCEPTION_WEIGHTS: {path} does not exist; "
                            f"it must be {hint}")
        return path
    target = settings.cache_dir.expanduser() / WEIGHTS_FILE
    for candidate in (target, Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE):
        if candidate.is_file():
            return candidate
    warn(f"downloading {hint} to {target}")
    try:
        _download(WEIGHTS_URL, target)
    except OSError as err:
        raise UserError(
            f"the Inception weights file {WEIGHTS_FILE} is needed and could not be downloaded "
            f"({err}). Download it once from {WEIGHTS_URL} and put it at {target}, or pass its "
            f"path with --inception-weights PATH (or set ST_INCEPTION_WEIGHTS=PATH)") from None
    return target


def build_extractor(settings: Settings, roles: tuple[str, ...]) -> FeatureExtractorBase:
    """The feature extractor computing the layers of ``roles`` ("pool", "logits")."""
    layers = settings.layers()
    device = settings.torch_device
    build = partial(create_feature_extractor, settings.extractor,
                    sorted({layers[r] for r in roles}), cuda=device == "cuda", verbose=False)
    if settings.extractor != INCEPTION:
        return build()
    weights = inception_weights(settings)
    load_inception_state(weights)  # the digest and tensors-only checks, with clear errors
    try:  # torch-fidelity loads with weights_only=False: overruled
        with weights_only_loads():
            return build(feature_extractor_weights_path=str(weights))
    except Exception as err:  # a state dict of other shapes
        raise UserError(f"cannot load the Inception weights {weights}: {err}; it must be "
                        f"torch-fidelity's {WEIGHTS_FILE} (from {WEIGHTS_URL})") from None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception_state(path: Path, check_digest: bool = True) -> dict[str, torch.Tensor]:
    """The Inception state dict of `path`: its SHA-256 checked against the published weights'
    before anything reads it, then loaded with weights_only=True (tensors only, no code)."""
    hint = f"it must be torch-fidelity's {WEIGHTS_FILE} (from {WEIGHTS_URL})"
    if check_digest:
        digest = sha256(path)
        if not digest.startswith(WEIGHTS_SHA256_PREFIX):
            raise UserError(f"the Inception weights {path} have SHA-256 {digest}, not that of the "
                            f"published weights ({WEIGHTS_SHA256_PREFIX}...); refusing to load "
                            f"them: {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for anything but plain tensors
        raise UserError(f"cannot load the Inception weights {path} as plain tensors "
                        f"({str(err).splitlines()[0]}); {hint}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                              for k, v in state.items()):
        raise UserError(f"the Inception weights {path} are not a state dict of tensors; {hint}")
    return state


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside loads tensors only and runs no code, even one that passes
    ``weights_only=False``: torch's documented ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, set for the
    duration (its opposite, which torch refuses beside it, is lifted meanwhile)."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.pop(name, None) for name in names}
    os.environ[names[0]] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def extract(dataset: Dataset, extractor: FeatureExtractorBase, settings: Settings,
            label: str) -> dict[str, torch.Tensor]:
    """Features {role: (N, D) float32} of a dataset of uint8 (3, H, W) images."""
    layers = settings.layers()
    device = settings.torch_device
    if settings.resize_mode == "clean":
        dataset = CleanResized(dataset)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in extractor.features_list}
    loader = DataLoader(dataset, batch_size=settings.batch_size, num_workers=0)
    done = 0
    with StepProgress(f"features of {label}", len(dataset)) as progress, torch.no_grad():
        for batch in loader:
            out = extractor.convert_features_tuple_to_dict(extractor(batch.to(device)))
            for k, v in out.items():
                parts[k].append(v.float().cpu())
            done += len(batch)
            progress.update(done, {"images": str(done)})
    return {role: torch.cat(parts[layer]) for role, layer in layers.items() if layer in parts}


@dataclass
class Reference:
    """What a reference set contributes: FID statistics and the pool features (KID, PRC)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: torch.Tensor | None  # None for published mu/sigma statistics (FID only)
    meta: dict

    @classmethod
    def from_features(cls, features: torch.Tensor, meta: dict) -> Reference:
        stats = fid_features_to_statistics(features)
        return cls(stats["mu"], stats["sigma"], features, meta)


class Metric(Component):
    """A metric of samples against a reference, on the features of one role."""

    role: ClassVar[str] = "pool"

    def min_samples(self) -> int:
        return 2

    def check(self, n_samples: int, n_ref: int) -> None:
        """A clear UserError if there are fewer samples than the metric needs."""
        for what, n in (("samples", n_samples), ("reference images", n_ref)):
            if n < self.min_samples():
                raise UserError(f"{self.name.upper()} needs at least {self.min_samples()} "
                                f"{what}, got {n}")

    def compute(self, samples: dict[str, torch.Tensor], ref: Reference) -> dict[str, float]:
        raise NotImplementedError


@METRICS.register
class FID(Metric):
    """Fréchet distance between Gaussians fitted to the pool features (torch-fidelity's)."""

    name: Literal["fid"] = "fid"

    def compute(self, samples, ref):
        n, dim = samples["pool"].shape
        if n < dim:
            warn(f"{n} samples for {dim} features: the sample covariance is singular and FID is "
                 f"strongly biased upwards; the protocol uses 50,000 samples")
        stats = fid_features_to_statistics(samples["pool"])
        # both sides in float64: published statistics (npz) come in either precision
        as64 = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
        ref64 = {"mu": np.asarray(ref.mu, np.float64), "sigma": np.asarray(ref.sigma, np.float64)}
        value = next(iter(fid_statistics_to_metric(as64, ref64, False).values()))
        # a distance: the matrix square root rounds it below 0 for (near-)identical sets
        return {"fid": max(float(value), 0.0)}


@METRICS.register
class ISC(Metric):
    """Inception Score of the samples alone, over ``splits`` splits (mean and std)."""

    name: Literal["isc"] = "isc"
    role: ClassVar[str] = "logits"
    splits: PositiveInt = 10

    def check(self, n_samples, n_ref):
        if n_samples < self.splits:
            raise UserError(f"IS needs at least {self.splits} samples (one per split), "
                            f"got {n_samples}")

    def compute(self, samples, ref):
        out = isc_features_to_metric(samples["logits"], self.splits)
        return {"isc_mean": out["inception_score_mean"], "isc_std": out["inception_score_std"]}


@METRICS.register
class KID(Metric):
    """Kernel Inception Distance (cubic polynomial kernel, unbiased MMD² over subsets).  The
    subset size shrinks to the smaller set when either has fewer than ``subset_size`` images."""

    name: Literal["kid"] = "kid"
    subsets: PositiveInt = 100
    subset_size: PositiveInt = 1000

    def compute(self, samples, ref):
        size = min(self.subset_size, len(samples["pool"]), len(ref.features))
        if size < self.subset_size:
            warn(f"KID subset size reduced from {self.subset_size} to {size} (too few images); "
                 f"values are not comparable to KID with subsets of {self.subset_size}")
        out = kid_features_to_metric(samples["pool"], ref.features, kid_subsets=self.subsets,
                                     kid_subset_size=size, verbose=False)
        return {"kid_mean": out["kernel_inception_distance_mean"],
                "kid_std": out["kernel_inception_distance_std"], "kid_subset_size": size}


@METRICS.register
class PRC(Metric):
    """Improved precision and recall (k-nearest-neighbour manifolds, k = ``neighborhood``)."""

    name: Literal["prc"] = "prc"
    neighborhood: PositiveInt = 3

    def min_samples(self) -> int:
        return self.neighborhood + 1

    def compute(self, samples, ref):
        out = prc_features_to_metric(samples["pool"], ref.features,
                                     prc_neighborhood=self.neighborhood, verbose=False)
        return {"precision": out["precision"], "recall": out["recall"], "f_score": out["f_score"]}

