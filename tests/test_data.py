"""Tests of stcli.components.data: every dataset, the transforms, and the registry entries (no network)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic_core import PydanticUndefined

from stcli.components.data import STL10, CelebA, Cifar10, Digits, Folder, ImageNet32, Toy2D
from stcli.infra.errors import UserError
from stcli.infra.registry import DATASETS


# --- digits ----------------------------------------------------------------------------------
def test_digits_splits_shape_and_range():
    spec = Digits(image_size=16)
    train, test, every = (spec.create(s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (1500, 297, 1797)
    x = every.data
    assert spec.shape == (1, 16, 16) and spec.dim == 256
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.uint8
    assert x.min() == 0 and x.max() == 255
    assert torch.equal(train[3], every[3]) and torch.equal(test[0], every[1500])


def test_digits_border_is_zero_and_content_matches_the_digit():
    from sklearn.datasets import load_digits

    x = Digits(image_size=32).create("all").data  # padding 4, digit 24x24
    border = torch.ones(32, 32, dtype=torch.bool)
    border[4:28, 4:28] = False
    assert x[:, 0, border].eq(0).all()
    back = F.interpolate(x[:, :, 4:28, 4:28].float(), size=(8, 8), mode="area").flatten(1)
    orig = torch.from_numpy(load_digits().images).flatten(1).float() * 255 / 16
    a, b = back - back.mean(1, keepdim=True), orig - orig.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert corr.min() > 0.9
    assert (back - orig).abs().mean() < 20


def test_digits_padding_must_leave_room():
    with pytest.raises(ValueError, match="padding"):
        Digits(image_size=8, padding=4)


# --- transform / to_uint8 --------------------------------------------------------------------
def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 4, 5), generator=g, dtype=torch.uint8)


def test_transform_endpoints_and_roundtrip():
    spec = Cifar10()
    k = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2)
    assert spec.transform(k).tolist() == [[[[-1.0, 1.0]]]]
    assert spec.transform(k).dtype == torch.float32
    assert Cifar10(centered=False).transform(k).tolist() == [[[[0.0, 1.0]]]]
    b = _batch()
    for centered in (True, False):
        s = Cifar10(centered=centered)
        assert torch.equal(s.to_uint8(s.transform(b)), b)


def test_uniform_dequantization_stays_in_its_bin_and_is_reproducible():
    spec = Cifar10(dequantization="uniform", centered=False)
    b = _batch(256)
    b[0] = 255  # the top bin, where float32 rounding could reach (k+1)/256
    x = spec.transform(b, torch.Generator().manual_seed(1))
    k = b.double()
    assert (x.double() >= k / 256).all() and (x.double() < (k + 1) / 256).all()
    # to_uint8 inverts it exactly, centred or not (round(255 x) gave 1 for 0 and 254 for 255
    # about half the time), and maps each bin's centre back to its pixel
    for centered in (True, False):
        s = Cifar10(dequantization="uniform", centered=centered)
        for seed in range(3):
            assert torch.equal(s.to_uint8(s.transform(b, torch.Generator().manual_seed(seed))), b)
    centres = (torch.arange(256, dtype=torch.float64) + 0.5) / 256
    assert torch.equal(spec.to_uint8(centres), torch.arange(256).to(torch.uint8))
    again = spec.transform(b, torch.Generator().manual_seed(1))
    assert torch.equal(x, again)
    assert not torch.equal(x, spec.transform(b, torch.Generator().manual_seed(2)))
    frac = x.double() * 256 - k  # the noise: U[0, 1), mean 1/2, sd 1/sqrt(12)
    assert abs(frac.mean().item() - 0.5) < 5 / (12 * frac.numel()) ** 0.5


def test_flip_uses_generator_decisions_then_noise():
    spec = Cifar10(random_flip=True)
    b = _batch(200)
    decide = torch.rand(200, generator=torch.Generator().manual_seed(3)) < 0.5
    x = spec.transform(b, torch.Generator().manual_seed(3))
    expected = Cifar10().transform(torch.where(decide.view(-1, 1, 1, 1), b.flip(-1), b))
    assert torch.equal(x, expected)
    assert 70 < decide.sum() < 130  # Binomial(200, 1/2): mean 100, sd ~7
    both = Cifar10(random_flip=True, dequantization="uniform")
    g = torch.Generator().manual_seed(4)
    flips = torch.rand(200, generator=g) < 0.5
    noise = torch.rand(b.shape, generator=g).clamp(max=1 - 2**-16)
    k = torch.where(flips.view(-1, 1, 1, 1), b.flip(-1), b).float()
    out = both.transform(b, torch.Generator().manual_seed(4))
    assert torch.equal(out, 2 * ((k + noise) / 256) - 1)


# --- folder ----------------------------------------------------------------------------------
def test_folder_reads_nested_rgb_and_gray_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    Image.new("RGB", (40, 24), (200, 30, 90)).save(tmp_path / "a" / "solid.PNG")
    ramp = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    Image.fromarray(ramp).save(tmp_path / "a" / "b" / "g.jpg")
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "small.bmp")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = Folder(root=str(tmp_path), image_size=16).create("train")
    assert [p.name for p in ds.paths] == ["g.jpg", "solid.PNG", "small.bmp"]
    items = [ds[i] for i in range(len(ds))]
    assert all(x.shape == (3, 16, 16) and x.dtype == torch.uint8 for x in items)
    colour = torch.tensor([200, 30, 90], dtype=torch.uint8).view(3, 1, 1)
    assert torch.equal(items[1], colour.expand(3, 16, 16))
    assert torch.equal(items[0][0], items[0][1]) and torch.equal(items[0][1], items[0][2])
    assert items[0][0].float().std() > 10  # the gray ramp survives as a ramp
    with pytest.raises(UserError, match="only has a 'train' split"):
        Folder(root=str(tmp_path)).create("test")
    cached = Folder(root=str(tmp_path), image_size=16, in_memory=True).create("train")
    assert torch.equal(cached.data, torch.stack(items))  # decoded once, same pixels


def test_folder_train_test_subfolders(tmp_path):
    for split, n in (("train", 2), ("test", 1)):
        (tmp_path / split).mkdir()
        for i in range(n):
            Image.new("RGB", (8, 8)).save(tmp_path / split / f"{i}.png")
    spec = Folder(root=str(tmp_path), image_size=8)
    assert (len(spec.create("train")), len(spec.create("test"))) == (2, 1)


def test_folder_empty_or_missing(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        Folder(root=str(tmp_path)).create()
    with pytest.raises(UserError, match="does not exist"):
        Folder(root=str(tmp_path / "nope")).create()


# --- missing data, fixed sizes, downloads ----------------------------------------------------
@pytest.mark.parametrize("cls", [Cifar10, STL10, CelebA, ImageNet32])
def test_missing_root_names_the_path(cls, tmp_path):
    root = str(tmp_path / "missing")
    with pytest.raises(UserError) as err:
        cls(root=root).create("train")
    assert root in str(err.value)


def test_cifar10_message_says_how_to_get_the_data(tmp_path):
    with pytest.raises(UserError, match="data.download=true.*'cifar-10-batches-py'"):
        Cifar10(root=str(tmp_path)).create("test")


def test_fixed_sizes_and_download_support():
    with pytest.raises(ValueError, match="image_size must be 32"):
        Cifar10(image_size=64)
    with pytest.raises(ValueError, match="image_size must be 32"):
        ImageNet32(image_size=16)
    with pytest.raises(ValueError, match="cannot be downloaded"):  # refused before any network use
        CelebA.model_validate({"name": "celeba", "download": "yes"})
    assert STL10().shape == (3, 48, 48) and CelebA().shape == (3, 64, 64)


def test_unknown_split_lists_valid_ones():
    with pytest.raises(UserError, match="train, test, unlabeled, train\\+unlabeled"):
        STL10().create("valid")


# --- imagenet32 ------------------------------------------------------------------------------
def test_imagenet32_layout_and_pixel_order(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "Imagenet32_train_npz").mkdir()
    (tmp_path / "Imagenet32_val_npz").mkdir()
    train = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(10)]
    for i, rows in enumerate(train, 1):
        path = tmp_path / "Imagenet32_train_npz" / f"train_data_batch_{i}.npz"
        np.savez(path, data=rows, labels=np.ones(2))
    val = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    np.savez(tmp_path / "Imagenet32_val_npz" / "val_data.npz", data=val)
    spec = ImageNet32(root=str(tmp_path), source="npz")
    ds, test = spec.create("train"), spec.create("test")
    assert (len(ds), len(test)) == (20, 3) and ds[0].shape == (3, 32, 32)
    data = np.concatenate(train)
    for i, c, y, x in [(0, 0, 0, 0), (5, 1, 3, 17), (19, 2, 31, 31)]:
        assert ds[i][c, y, x] == data[i, c * 1024 + y * 32 + x]
    assert test[2][1, 2, 3] == val[2, 1024 + 2 * 32 + 3]
    (tmp_path / "Imagenet32_train_npz" / "train_data_batch_7.npz").unlink()
    with pytest.raises(UserError, match="train_data_batch_7"):
        spec.create("train")


# --- celeba ----------------------------------------------------------------------------------
def test_celeba_layout_partition_and_shape(tmp_path):
    folder = tmp_path / "img_align_celeba"
    folder.mkdir()
    for i in range(1, 5):
        Image.new("RGB", (178, 218), (10 * i, 0, 0)).save(folder / f"{i:06d}.jpg")
    spec = CelebA(root=str(tmp_path))
    assert len(spec.create("train")) == 4
    with pytest.raises(UserError, match="list_eval_partition.txt"):
        spec.create("test")
    lines = ["000001.jpg 0", "000002.jpg 0", "000003.jpg 1", "000004.jpg 2"]
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    sizes = [len(spec.create(s)) for s in ("train", "valid", "test")]
    assert sizes == [2, 1, 1]
    x = spec.create("test")[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8
    assert abs(x[0].float().mean().item() - 40) < 3 and x[1:].float().mean() < 3
    # an image listed in two splits would put test images into training: refused
    (tmp_path / "list_eval_partition.txt").write_text("\n".join([*lines, "000001.jpg 2"]) + "\n")
    with pytest.raises(UserError, match="lists 000001.jpg more than once"):
        spec.create("train")


# --- toy2d -----------------------------------------------------------------------------------
def test_toy2d_gmm_moments_match_closed_form():
    spec = Toy2D(n=20000, modes=5, radius=1.5, mode_std=0.2)
    x = spec.create("train").data.double()
    assert spec.shape == (2,) and spec.dim == 2 and x.shape == (20000, 2)
    means, std, w = spec.gmm_params()
    mean = w @ means
    eye = torch.eye(2, dtype=torch.float64)
    cov = std**2 * eye + (means.T * w) @ means - torch.outer(mean, mean)
    n = len(x)
    assert ((x.mean(0) - mean).abs() <= 5 * (cov.diagonal() / n).sqrt()).all()
    c = x - mean  # sample covariance about the true mean; its standard error from the sample
    prods = c[:, :, None] * c[:, None, :]
    assert ((prods.mean(0) - cov).abs() <= 5 * prods.std(0) / n**0.5).all()
    assert not torch.equal(spec.create("test").data, spec.create("train").data)
    assert torch.equal(spec.create("train").data, x.float())
    assert spec.transform(x.float()[:3]).dtype == torch.float32


def test_toy2d_checkerboard_samples_lie_on_black_squares():
    x = Toy2D(kind="checkerboard", n=5000).create("test").data
    cells = torch.floor(x).long()
    assert ((x >= -2) & (x < 2)).all()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.bincount((cells[:, 0] + 2) * 4 + cells[:, 1] + 2, minlength=16)
    assert (counts.view(4, 4)[[0, 1, 2, 3], [0, 1, 2, 3]] > 500).all()  # black squares all used
    with pytest.raises(UserError, match="gmm"):
        Toy2D(kind="checkerboard").gmm_params()


# --- registry --------------------------------------------------------------------------------
def test_registry_builds_and_rejects_unknown_fields():
    from stcli.infra.registry import DATASETS

    names = {"digits", "folder", "cifar10", "stl10", "celeba", "imagenet32", "toy2d"}
    assert names <= set(DATASETS.names())
    ds = DATASETS.validate("digits", image_size=16).create("train")
    assert len(ds) == 1500 and ds[0].shape == (1, 16, 16)
    assert len(DATASETS.build("digits", image_size=16, split="test")) == 297
    with pytest.raises(UserError, match="imgsize"):
        DATASETS.validate("digits", imgsize=3)
    with pytest.raises(UserError, match="imgsize"):
        DATASETS.build("digits", imgsize=3)


def test_toy2d_picture_is_a_histogram_with_y_up():
    spec = Toy2D()
    x = torch.tensor([[-2.99, -2.99], [-2.99, -2.99], [2.99, 2.99], [10.0, 0.0]])  # last: off-canvas
    img = spec.picture(x, size=4, extent=3.0)
    assert img.shape == (1, 1, 4, 4) and img.dtype == torch.uint8
    assert img[0, 0, 3, 0] == 255  # two points at the bottom-left corner: the maximum
    assert img[0, 0, 0, 3] == round(255 / 2**0.5)  # one point, top-right: sqrt contrast
    assert int(img.sum()) == 255 + round(255 / 2**0.5)


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_declares_the_shared_interface(name):
    """is_image, zero_centered, bpd_offset and to_uint8 agree with what `transform` does: for
    8-bit images the model-space range r of the 256 levels gives bits/dim offset log2(256 / r),
    and to_uint8 inverts transform; image sets name the folder they read, others refuse pixels."""
    spec_cls = DATASETS.spec(name)
    if not spec_cls.is_image:
        spec = spec_cls.model_validate({"name": name})
        assert spec.bpd_offset() == 0.0 and spec.data_root is None
        with pytest.raises(NotImplementedError, match="8-bit images"):
            spec.to_uint8(torch.zeros(1, 2))
        return
    for centered in (True, False):
        given = {"centered": centered, "dequantization": "none", "random_flip": False}
        defaults = {k: f.default for k, f in spec_cls.model_fields.items()
                    if f.default is not PydanticUndefined}
        spec = spec_cls.model_construct(**{**defaults, **given})  # no files needed
        ends = spec.transform(torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)).flatten()
        assert spec.zero_centered == bool(ends[0] < 0 < ends[1])
        assert spec.bpd_offset() == pytest.approx(math.log2(256 / float(ends[1] - ends[0])), abs=1e-12)
        levels = torch.arange(256, dtype=torch.uint8).view(256, 1, 1, 1)
        assert torch.equal(spec.to_uint8(spec.transform(levels)), levels)
        assert spec.data_root == spec.root

