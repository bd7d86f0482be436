"""FID for 16x16 digits with a small digit classifier as the feature extractor.

Inception features of upscaled 16x16 grayscale digits say little, and the Inception weights
need a download; so this module trains a small CNN classifier on the digits train split
(seeded, CPU, a few seconds), saves it with safetensors, and registers it with
torch-fidelity's feature-extractor registry as ``st-digits-cnn`` — the mechanism
`stcli.components.metrics` uses for its test extractor ``st-random-64``.  FID is then torch-fidelity's
own: Gaussian statistics of the 64-d penultimate features (``fid_features_to_statistics``)
and the Fréchet distance (``fid_statistics_to_metric``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
from torch_fidelity.utils import create_feature_extractor

from stcli.components.metrics import SmallFeatures

NAME = "st-digits-cnn"
SIZE = 16


class DigitNet(nn.Module):
    """conv 16 -> pool -> conv 32 -> pool -> 64 features (ReLU) -> 10 logits, on 16x16 inputs."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.fc, self.head = nn.Linear(32 * 4 * 4, 64), nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W), C = 1 or 3 -> (B, 64)."""
        x = x.float().mean(1, keepdim=True) / 127.5 - 1
        if x.shape[-1] != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DigitFeatures(SmallFeatures):
    """torch-fidelity wrapper of a trained DigitNet: features "64" (FID) and "logits" (IS)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        self.net = DigitNet()
        if feature_extractor_weights_path:
            self.net.load_state_dict(load_file(feature_extractor_weights_path))

    def pool(self, x):
        return self.net.features(x)

    def logits(self, pool):
        return self.net.head(pool)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(NAME, DigitFeatures)


# --- training the classifier ---------------------------------------------------------------------
def digit_split(split: str, image_size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 1, H, W) of stcli's digits data set and their labels."""
    from sklearn.datasets import load_digits

    from stcli.components.data import Digits

    spec = Digits(image_size=image_size)
    dataset = spec.create(split)
    images = torch.stack([dataset[i] for i in range(len(dataset))])
    labels = torch.from_numpy(load_digits().target[spec.ranges[split]]).long()
    return images, labels


def train_classifier(path: Path, epochs: int = 30, seed: int = 0) -> dict:
    """Train DigitNet on the train split (Adam, batch 100, seeded), save it, return accuracies."""
    x, y = digit_split("train")
    torch.manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(100):
            opt.zero_grad()
            F.cross_entropy(net(_shift(x[idx], g)), y[idx]).backward()
            opt.step()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return {"train_accuracy": accuracy(net, x, y), "test_accuracy": accuracy(net, *digit_split("test")),
            "epochs": epochs, "seed": seed}


def _shift(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (augmentation), drawn from g."""
    dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
    return torch.roll(x, (dy, dx), (2, 3))


@torch.no_grad()
def accuracy(net: DigitNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((net.eval()(x).argmax(1) == y).float().mean())


# --- FID -----------------------------------------------------------------------------------------
def extractor(weights: Path | None) -> FeatureExtractorBase:
    """The registered extractor, built through torch-fidelity's registry on the CPU."""
    return create_feature_extractor(NAME, ["64"], cuda=False, verbose=False,
                                    feature_extractor_weights_path=str(weights) if weights else None)


@torch.no_grad()
def features(images: torch.Tensor, ext: FeatureExtractorBase, batch: int = 500) -> torch.Tensor:
    """64-d features of uint8 images (N, C, H, W)."""
    return torch.cat([ext(part)[0] for part in images.split(batch)]).double()


def fid(sample_feats: torch.Tensor, ref_feats: torch.Tensor) -> float:
    stats = [fid_features_to_statistics(f) for f in (sample_feats, ref_feats)]
    return float(next(iter(fid_statistics_to_metric(*stats, False).values())))


def fid_bootstrap_se(sample_feats: torch.Tensor, ref_feats: torch.Tensor, n: int = 200,
                     seed: int = 0) -> float:
    """Standard deviation of the FID over `n` bootstrap resamples of the samples (with
    replacement, the reference held fixed): the standard error of one FID from finitely many
    samples."""
    g = torch.Generator().manual_seed(seed)
    ref = fid_features_to_statistics(ref_feats)
    values = [float(next(iter(fid_statistics_to_metric(
        fid_features_to_statistics(sample_feats[torch.randint(len(sample_feats), (len(sample_feats),),
                                                              generator=g)]), ref, False).values())))
        for _ in range(n)]
    return float(np.std(values, ddof=1))


def npz_images(path: Path) -> torch.Tensor:
    """uint8 (N, H, W, C) from `st sample --format npz` as (N, C, H, W)."""
    with np.load(path, allow_pickle=False) as z:
        return torch.from_numpy(z["arr_0"]).permute(0, 3, 1, 2).contiguous()
