"""`st data prepare`: small fake releases (CelebA zip + partition file, ImageNet32 PNG tarballs,
a CelebA-HQ image folder) laid out for st's loaders; bad releases refused with nothing written.
Also the missing-data messages: absolute root, expected layout, where the data is published."""

import io
import tarfile
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_st, st
from PIL import Image

from stcli.components.data import STL10, CelebA, Cifar10, Folder, ImageNet32, read_image
from stcli.infra.errors import UserError


def image_bytes(rng, w, h, fmt="PNG", mode="RGB") -> bytes:
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


@pytest.fixture
def prepare(capsys):
    """`st data prepare ARGS` in this process (one test runs it as a real subprocess)."""
    def run(*args):
        code, out, err = st(capsys, "data", "prepare", *args)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


def fake_celeba(folder, n=6, partition=True):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = {f"{i:06d}.jpg": image_bytes(rng, 18, 22, "JPEG") for i in range(1, n + 1)}
    with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as zf:
        for name, data in files.items():
            zf.writestr(f"img_align_celeba/{name}", data)
    if partition:
        (folder / "list_eval_partition.txt").write_text(
            "".join(f"{name} {i % 3}\n" for i, name in enumerate(files)))
    return files


@pytest.mark.parametrize("source", ["dl", "dl/img_align_celeba.zip"])
def test_celeba_release_is_laid_out_for_the_loader(tmp_path, source):
    """--from the download folder or the zip itself (the partition file found next to it)."""
    files = fake_celeba(tmp_path / "dl")
    out = tmp_path / "celeba"
    res = run_st("data", "prepare", "celeba", "--from", tmp_path / source, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "train 2, valid 2, test 2" in res.stdout
    for name, data in files.items():
        assert (out / "img_align_celeba" / name).read_bytes() == data  # copied byte for byte
    assert sorted(p.name for p in out.iterdir()) == ["img_align_celeba", "list_eval_partition.txt"]
    spec = CelebA(root=str(out), image_size=8)
    test = spec.create("test")
    assert len(test) == 2 and len(spec.create("train")) == 2
    expected = read_image(out / "img_align_celeba" / "000003.jpg", 8, pre_crop=140)
    assert torch.equal(test[0], expected)  # lines 3 and 6 are the test split


@pytest.mark.parametrize("case", ["missing_image", "bad_line", "twice", "no_images", "out_taken"])
def test_bad_celeba_release_is_refused_untouched(prepare, tmp_path, case):
    fake_celeba(tmp_path / "dl")
    out = tmp_path / "celeba"
    part = tmp_path / "dl" / "list_eval_partition.txt"
    if case == "missing_image":
        part.write_text(part.read_text() + "000099.jpg 2\n")
    elif case == "bad_line":
        part.write_text(part.read_text() + "000001.jpg 01\n")
    elif case == "twice":  # a train image also listed as test: it would leak into training
        part.write_text(part.read_text() + "000001.jpg 2\n")
    elif case == "no_images":
        with zipfile.ZipFile(tmp_path / "dl" / "img_align_celeba.zip", "w") as zf:
            zf.writestr("README.txt", "nothing")
    else:
        (out / "img_align_celeba").mkdir(parents=True)
        (out / "img_align_celeba" / "mine.jpg").write_bytes(b"keep")
    res = prepare("celeba", "--from", tmp_path / "dl", "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    message = {"missing_image": "lists 1 image(s) that the archive lacks, e.g. 000099.jpg",
               "bad_line": "found '000001.jpg 01'",
               "twice": "lists 000001.jpg more than once (1 repeated line(s))",
               "no_images": "holds no img_align_celeba/*.jpg",
               "out_taken": "already exists and is not empty"}[case]
    assert message in res.stderr.replace("\n", "")
    if case == "out_taken":
        assert [p.name for p in out.rglob("*")] == ["img_align_celeba", "mine.jpg"]
    else:
        assert not out.exists()


def fake_tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_imagenet32_tarballs_become_png_folders(prepare, tmp_path):
    rng = np.random.default_rng(1)
    dl = tmp_path / "dl"
    dl.mkdir()
    train = {f"train_32x32/{i:07d}.png": image_bytes(rng, 32, 32) for i in range(5)}
    valid = {f"valid_32x32/{i:05d}.png": image_bytes(rng, 32, 32) for i in range(3)}
    fake_tar(dl / "train_32x32.tar", train)
    fake_tar(dl / "valid_32x32.tar", valid)
    out = tmp_path / "imagenet32"
    res = prepare("imagenet32", "--from", dl, "--out", out)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["train_32x32", "valid_32x32"]
    for members in (train, valid):
        for name, data in members.items():
            assert (out / name).read_bytes() == data
    pixels = Folder(root=str(out / "train_32x32"), image_size=32).create("train")[0]
    first = np.array(Image.open(io.BytesIO(train["train_32x32/0000000.png"])))
    assert torch.equal(pixels, torch.from_numpy(first).permute(2, 0, 1))


@pytest.mark.parametrize("case", ["wrong_size", "not_png", "both_releases", "clash"])
def test_bad_imagenet32_tarball_is_refused_untouched(prepare, tmp_path, case):
    rng = np.random.default_rng(2)
    dl = tmp_path / "dl"
    dl.mkdir()
    members = {f"train_32x32/{i}.png": image_bytes(rng, 32, 32) for i in range(3)}
    odd = {"wrong_size": image_bytes(rng, 64, 64), "not_png": image_bytes(rng, 32, 32, "JPEG")}
    members["train_32x32/9.png"] = odd.get(case, image_bytes(rng, 32, 32))
    if case == "clash":
        members["other/0.png"] = members["train_32x32/1.png"]
    fake_tar(dl / "train_32x32.tar", members)
    fake_tar(dl / "valid_32x32.tar", {"valid_32x32/0.png": image_bytes(rng, 32, 32)})
    if case == "both_releases":
        fake_tar(dl / "Imagenet32_train.tar", members)
    out = tmp_path / "imagenet32"
    res = prepare("imagenet32", "--from", dl, "--out", out)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    message = {"wrong_size": "9.png is 64x64, not 32x32", "not_png": "9.png is not a PNG file",
               "both_releases": "holds two tarballs for train_32x32", "clash": "several files named 0.png"}
    assert message[case] in res.stderr.replace("\n", "")
    assert not out.exists()  # the valid split, though fine, is not left behind either


def test_celebahq_folder_is_box_downscaled(prepare, tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "hq"
    (src / "part2").mkdir(parents=True)
    (src / "00000.png").write_bytes(image_bytes(rng, 16, 16))
    (src / "part2" / "00001.jpg").write_bytes(image_bytes(rng, 16, 16, "JPEG"))
    out = tmp_path / "celebahq"
    res = prepare("celebahq", "--from", src, "--out", out, "--size", 4)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png"]
    for original in (src / "00000.png", src / "part2" / "00001.jpg"):
        big = np.array(Image.open(original).convert("RGB"), dtype=np.float64)
        block_mean = big.reshape(4, 4, 4, 4, 3).mean(axis=(1, 3))
        small = np.array(Image.open(out / f"{original.stem}.png"), dtype=np.float64)
        assert small.shape == (4, 4, 3) and np.abs(small - block_mean).max() <= 0.5
    assert len(Folder(root=str(out), image_size=4).create("train")) == 2


def test_celebahq_refuses_non_square_and_wrong_size(prepare, tmp_path):
    rng = np.random.default_rng(4)
    src = tmp_path / "hq"
    src.mkdir()
    (src / "a.png").write_bytes(image_bytes(rng, 16, 12))
    res = prepare("celebahq", "--from", src, "--out", tmp_path / "o", "--size", 4)
    assert res.returncode == 2 and "a.png is 16x12" in res.stderr.replace("\n", "")
    res = prepare("celeba", "--from", src, "--out", tmp_path / "o", "--size", 4)
    assert res.returncode == 2 and "--size applies to celebahq only" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("spec, layout, published", [
    (Folder(root="data/hq"), "anywhere under <root>", "st data prepare celebahq"),
    (CelebA(root="data/celeba"), "<root>/img_align_celeba/000001.jpg",
     "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"),
    (ImageNet32(root="data/i32"), "<root>/", "https://image-net.org/download-images"),
    (Cifar10(root="data/c10"), "<root>/cifar-10-batches-py/", "https://www.cs.toronto.edu/~kriz/cifar.html"),
    (STL10(root="data/stl"), "<root>/stl10_binary/", "https://cs.stanford.edu/~acoates/stl10/"),
])
def test_missing_data_message_says_where_and_what(tmp_path, monkeypatch, spec, layout, published):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as err:
        spec.create("train")
    message = str(err.value)
    assert f"is {tmp_path / spec.root}" in message and f"working directory {tmp_path}" in message
    assert "expected layout" in message and layout in message and published in message
    assert not (tmp_path / spec.root).exists()
