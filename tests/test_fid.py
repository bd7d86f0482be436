"""`st fid` / `st fid-ref` end to end on CPU with the test feature extractor (no download)."""

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from conftest import TINY, with_eval
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stcli.components import metrics
from stcli.jobs.cli import main

N = 96  # images per synthetic set: more than the 64 test features, so covariances are full rank


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Tests never download the Inception weights (or anything else)."""

    def refuse(url, target):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(metrics, "_download", refuse)


@pytest.fixture
def common(tmp_path):
    return ["--feature-extractor", "st-random-64", "--device", "cpu", "--batch-size", "32",
            "--cache-dir", str(tmp_path / "cache")]


def st(*args) -> int:
    """Run `st ARGS` in this process; the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit:
        return exit.code
    return 0


def noise(seed: int = 0, n: int = N, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def gradients(seed: int = 1, n: int = N, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size)[None, None, :, None] * rng.uniform(0.2, 1, (n, 1, 1, 3))
    return np.clip(ramp + rng.normal(0, 20, (n, size, size, 3)), 0, 255).astype(np.uint8)


def write_folder(path, images, mode="RGB"):
    """PNGs under path, every other one in a subfolder (the search is recursive)."""
    (path / "sub").mkdir(parents=True)
    for i, x in enumerate(images):
        Image.fromarray(x).convert(mode).save(path / ("sub" if i % 2 else "") / f"{i}.png")
    return path


def test_fid_of_a_set_against_itself_is_zero_and_reference_is_cached(tmp_path, common, capsys):
    folder = write_folder(tmp_path / "a", gradients())
    for expected in ("computed and cached", "from the cache"):
        assert st("fid", folder, "--ref", folder, "--json", tmp_path / "r.json", "--overwrite", *common) == 0
        assert expected in capsys.readouterr().out
        assert abs(json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"]) < 1e-9
    Image.fromarray(noise(n=1)[0]).save(folder / "new.png")  # new content: not the cached entry
    assert st("fid", folder, "--ref", folder, *common) == 0
    assert "computed and cached" in capsys.readouterr().out
    assert len(list((tmp_path / "cache" / "reference").iterdir())) == 2


def test_fid_of_a_singular_set_against_itself_is_zero_not_negative(capsys):
    """Fewer samples than features: the matrix square root rounds the distance below zero."""
    pool = torch.randn(96, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = metrics.Reference.from_features(pool, {})
    raw = metrics.fid_statistics_to_metric({"mu": ref.mu, "sigma": ref.sigma},
                                           {"mu": ref.mu, "sigma": ref.sigma}, False)
    assert next(iter(raw.values())) < 0  # the rounding the clamp removes
    assert metrics.FID().compute({"pool": pool}, ref)["fid"] == 0.0
    assert "96 samples for 256 features: the sample covariance is singular" in capsys.readouterr().err


def features(images: np.ndarray) -> np.ndarray:
    """Test-extractor features, computed here independently of `st fid`."""
    net = metrics.RandomFeatures(metrics.TEST_EXTRACTOR, ["64"])
    with torch.no_grad():
        (f,) = net(torch.from_numpy(images).permute(0, 3, 1, 2))
    return f.double().numpy()


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_fid_equals_the_closed_form_frechet_distance(tmp_path, common, capsys):
    a, b = noise(), gradients()
    np.savez(tmp_path / "a.npz", images=a)
    folder = write_folder(tmp_path / "b", b)
    out = tmp_path / "deep" / "r.json"
    assert st("fid", tmp_path / "a.npz", "--ref", folder, "--isc", "--kid", "--prc",
              "--json", out, "--overwrite", *common) == 0
    report = json.loads(out.read_text())
    expected = frechet(features(a), features(b))
    assert report["metrics"]["fid"] == pytest.approx(expected, rel=1e-4)
    assert report["n_samples"] == report["n_ref"] == N
    assert {"isc_mean", "kid_mean", "precision", "recall", "f_score"} <= report["metrics"].keys()
    assert report["metrics"]["kid_subset_size"] == N
    assert "KID subset size reduced from 1000 to 96" in capsys.readouterr().err
    # the same set as (N, C, H, W) npz and its own reference: 0
    np.savez(tmp_path / "nchw.npz", a.transpose(0, 3, 1, 2))
    assert st("fid", tmp_path / "nchw.npz", "--ref", tmp_path / "a.npz", "--json", out, "--overwrite",
              *common) == 0
    assert 0.0 <= json.loads(out.read_text())["metrics"]["fid"] < 1e-9


def write_recipe(path, out_dir, **data):
    recipe = {**TINY, "data": {**TINY["data"], **data},
              "train": {**TINY["train"], "out_dir": str(out_dir)},
              "eval": {"fid": {"ref": "digits-test", "n": 24}}}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_reference_statistics_round_trip_and_refusals(tmp_path, common, capsys):
    recipe = write_recipe(tmp_path / "tiny.yaml", tmp_path / "run")
    stats = tmp_path / "stats.safetensors"
    assert st("fid-ref", recipe, "--out", stats, "--split", "test", *common) == 0
    assert "grayscale" in capsys.readouterr().err  # digits: converted to 3 channels
    saved = load_file(str(stats))
    assert saved["features"].shape == (297, 64)
    assert np.allclose(saved["mu"].numpy(), saved["features"].double().mean(0).numpy(), atol=1e-6)
    assert np.allclose(saved["sigma"].numpy(), np.cov(saved["features"].double().numpy(),
                                                       rowvar=False))
    # computed once: a second run finds it up to date
    assert st("fid-ref", recipe, "--out", stats, "--split", "test", *common) == 0
    assert "up to date" in capsys.readouterr().out
    # round trip: statistics from the file give the FID of the images they were computed from
    folder = write_folder(tmp_path / "g", gradients(size=8))
    train_stats = tmp_path / "train.safetensors"
    assert st("fid-ref", recipe, "--out", train_stats, *common) == 0
    fids = []
    for ref in (train_stats, recipe):  # a recipe as --ref: its train split
        assert st("fid", folder, "--ref", ref, "--json", tmp_path / "r.json", "--overwrite", *common) == 0
        fids.append(json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"])
    assert fids[0] == pytest.approx(fids[1], rel=1e-12) and fids[0] > 0
    # images measured against a recipe (or its statistics) take the recipe's resize mode, as
    # `st fid-ref` does: tf against a clean-resize recipe compared other numbers
    clean = tmp_path / "clean.yaml"
    clean.write_text(recipe.read_text().replace("n: 24", "n: 24\n    resize: clean"))
    assert yaml.safe_load(clean.read_text())["eval"]["fid"]["resize"] == "clean"
    assert st("fid-ref", clean, "--out", tmp_path / "clean.safetensors", *common) == 0
    for ref in (clean, tmp_path / "clean.safetensors"):
        assert st("fid", folder, "--ref", ref, "--json", tmp_path / "r.json", "--overwrite", *common) == 0
        assert json.loads((tmp_path / "r.json").read_text())["resize"] == "clean"
    capsys.readouterr()
    # another source, or another extractor, is refused
    assert st("fid-ref", folder, "--out", stats, *common) == 2
    err = capsys.readouterr().err
    assert "refusing to reuse it" in err and "split test" in err and "Traceback" not in err
    other = [*common[2:], "--feature-extractor", "inception-v3-compat"]
    assert st("fid", folder, "--ref", stats, *other) == 2
    assert "feature extractor 'st-random-64'" in capsys.readouterr().err
    assert st("fid-ref", folder, "--out", stats, "--overwrite", *common) == 0
    with safe_open(str(stats), framework="pt") as f:
        assert json.loads(f.metadata()["source"])["kind"] == "folder"
    capsys.readouterr()
    # --overwrite replaces statistics, never another file (a checkpoint, any safetensors file)
    for name, tensors, meta in (("model.safetensors", {"w": torch.ones(2)}, {"recipe": "{}"}),
                                ("other.safetensors", {"w": torch.ones(2)}, {})):
        save_file(tensors, str(tmp_path / name), metadata=meta)
        before = (tmp_path / name).read_bytes()
        assert st("fid-ref", folder, "--out", tmp_path / name, "--overwrite", *common) == 2
        err = capsys.readouterr().err
        assert "not reference statistics" in err and "Traceback" not in err
        assert (tmp_path / name).read_bytes() == before


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt, tmp_path_factory):
    """The tiny checkpoint (2 training steps on 8x8 digits) with the eval.fid section of
    `write_recipe` in its recipe, and that recipe."""
    root = tmp_path_factory.mktemp("ckpt")
    recipe = write_recipe(root / "tiny.yaml", root / "run")
    fid = yaml.safe_load(recipe.read_text())["eval"]["fid"]
    return with_eval(tiny_ckpt, root / "ckpt.safetensors", {"fid": fid}), recipe


def test_checkpoint_with_statistics_of_other_data_is_refused(ckpt, tmp_path, common, capsys):
    path, _ = ckpt
    other = write_recipe(tmp_path / "other.yaml", tmp_path / "o", image_size=16)
    assert st("fid-ref", other, "--out", tmp_path / "s.safetensors", *common) == 0
    assert st("fid", path, "-n", 32, "--ref", tmp_path / "s.safetensors", *common) == 2
    assert "was trained on dataset digits (image_size=8" in capsys.readouterr().err
    assert st("fid", tmp_path / "s.safetensors", "--ref", path, *common) == 2
    assert "pass it as --ref" in capsys.readouterr().err


def test_fid_of_a_checkpoint_end_to_end(ckpt, tmp_path, common, capsys):
    path, recipe = ckpt
    stats = tmp_path / "s.safetensors"
    assert st("fid-ref", recipe, "--out", stats, *common) == 0
    kept = tmp_path / "samples"
    assert st("fid", path, "-n", 32, "--ref", stats, "--samples-dir", kept, "--kid",
              "--json", tmp_path / "r.json", "--overwrite", *common) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_samples"] == 32 and report["metrics"]["fid"] > 0
    assert (kept / "grid.png").is_file()  # written by `st sample`, not measured
    assert len([p for p in kept.rglob("*.png") if p.name != "grid.png"]) == 32
    made = json.loads((kept / "manifest.json").read_text())
    assert report["samples_provenance"] == made and made["count"] == 32 and made["seed"] == 0
    assert made["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert report["ref_identity"]["content_hash"] == report["ref_content_hash"]
    assert report["ref_identity"]["source"]["kind"] == "recipe"
    assert report["extractor_identity"]["name"] == "st-random-64"
    # the kept folder's images were drawn with seed 0: a FID "with seed 5" of them is refused
    capsys.readouterr()
    assert st("fid", path, "-n", 32, "--ref", stats, "--samples-dir", kept, "--seed", 5, *common) == 2
    assert "holds samples made with another seed (0 there, 5 requested)" in capsys.readouterr().err
    assert st("fid", kept, "--ref", stats, "--json", tmp_path / "k.json", "--overwrite", *common) == 0
    assert json.loads((tmp_path / "k.json").read_text())["samples_provenance"] == made
    # defaults from the checkpoint's recipe: eval.fid.ref digits-test (its own data), n = 24
    assert st("fid", path, "--json", tmp_path / "d.json", "--overwrite", *common) == 0
    report = json.loads((tmp_path / "d.json").read_text())
    assert (report["ref"], report["n_samples"], report["n_ref"]) == ("digits-test", 24, 297)
    # NAME-SPLIT names the checkpoint's own data: another NAME (torch-fidelity's CIFAR-10 test
    # split is cifar10-val) was measured against the digits and labelled cifar10-test
    for wrong in ("cifar10-test", "foo-bar-all"):
        assert st("fid", path, "--ref", wrong, *common) == 2
        err = capsys.readouterr().err
        assert f"--ref {wrong}: " in err and "is not the checkpoint's data ('digits'" in err, err
    # a folder `st sample` did not finish is refused, not measured as a smaller set
    for image in sorted(p for p in kept.rglob("*.png") if p.name != "grid.png")[:4]:
        image.unlink()
    assert st("fid", kept, "--ref", stats, *common) == 2
    assert "holds 28 images but its manifest says 32 were drawn" in capsys.readouterr().err
    # a checkpoint renamed .st is still a checkpoint
    renamed = tmp_path / "model.st"
    renamed.write_bytes(path.read_bytes())
    assert st("fid", renamed, "-n", 8, "--ref", stats, "--json", tmp_path / "st.json", *common) == 0
    assert json.loads((tmp_path / "st.json").read_text())["n_samples"] == 8


def bad_inputs(tmp_path):
    """(arguments, expected message) for each kind of bad input."""
    empty = tmp_path / "empty"
    empty.mkdir()
    mixed = write_folder(tmp_path / "mixed", noise(n=3))
    Image.fromarray(noise(n=1, size=8)[0]).save(mixed / "small.png")
    broken = write_folder(tmp_path / "broken", noise(n=3))
    (broken / "sub" / "bad.png").write_text("not an image")
    one = write_folder(tmp_path / "one", noise(n=1))
    few = write_folder(tmp_path / "few", noise(n=5))
    np.savez(tmp_path / "float.npz", images=noise().astype(np.float32))
    (tmp_path / "weights.pth").write_bytes(b"\x80garbage")
    return [
        (["fid", empty, "--ref", few], "no images (.png, .jpg, .jpeg) under"),
        (["fid", mixed, "--ref", few], "differ in size"),
        (["fid", broken, "--ref", few], "bad.png"),
        (["fid", few, "--ref", one], "FID needs at least 2 reference images, got 1"),
        (["fid", few, "--ref", few, "--isc"], "IS needs at least 10 samples"),
        (["fid", few, "--ref", few, "--prc"], None),  # 5 >= k + 1 = 4: fine
        (["fid", one, "--ref", few, "--prc"], "FID needs at least 2 samples"),
        (["fid", tmp_path / "float.npz", "--ref", few], "expected uint8 images"),
        (["fid", few, "--ref", tmp_path / "missing"], "does not exist"),
        (["fid", few, "--ref", few, "-n", 3], "-n apply to a checkpoint only"),
        # drawing options on a set of images were ignored: each is refused, naming them all
        (["fid", few, "--ref", few, "--sampler", "ode", "--seed", 5, "--weights", "raw",
          "--samples-dir", tmp_path / "sd"], "--samples-dir, --seed, --weights, --sampler apply "
         "to a checkpoint only"),
        (["fid-ref", few, "--out", tmp_path / "st.safetensors", "--split", "test"],
         "--split applies to a recipe's dataset"),
        (["fid", few, "--ref", few, "--feature-extractor", "vgg"], "unknown feature extractor"),
    ]


def test_bad_input_is_one_message_and_exit_code_2(tmp_path, common, capsys):
    for args, message in bad_inputs(tmp_path):
        code = st(args[0], *common, *args[1:])  # the case's own options win
        err = capsys.readouterr().err
        assert (code, "Traceback" not in err) == ((0, True) if message is None else (2, True)), \
            ([str(a) for a in args], err)
        assert message is None or message in err, (args, err)


def test_inception_weights_missing_offline_or_damaged(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("ST_INCEPTION_WEIGHTS", raising=False)
    folder = write_folder(tmp_path / "f", noise(n=4))
    base = ["fid", folder, "--ref", folder, "--device", "cpu", "--cache-dir", tmp_path / "c"]
    assert st(*base) == 2
    err = capsys.readouterr().err
    for needed in (metrics.WEIGHTS_FILE, metrics.WEIGHTS_URL, str(tmp_path / "c"),
                   "--inception-weights", "ST_INCEPTION_WEIGHTS"):
        assert needed in err.replace("\n", ""), needed
    monkeypatch.setenv("ST_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    assert st(*base) == 2
    assert "nowhere.pth does not exist" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"\x80 not a weights file")
    assert st(*base, "--inception-weights", tmp_path / "bad.pth") == 2
    assert "not that of the published weights (6726825d...)" in capsys.readouterr().err


def test_grayscale_images_are_converted_and_said_so(tmp_path, common, capsys):
    images = gradients()
    gray = write_folder(tmp_path / "gray", images, mode="L")
    rgb = write_folder(tmp_path / "rgb", np.repeat(np.asarray(
        [np.asarray(Image.fromarray(x).convert("L")) for x in images])[..., None], 3, axis=3))
    assert st("fid", gray, "--ref", rgb, "--json", tmp_path / "r.json", "--overwrite", *common) == 0
    assert f"{N} of {N} images under {gray} are grayscale: converted to 3 channels" in \
        capsys.readouterr().err
    assert abs(json.loads((tmp_path / "r.json").read_text())["metrics"]["fid"]) < 1e-9
