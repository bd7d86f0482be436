"""Nothing silently wrong: every damaged or bad input is one message with exit code 2 (no
traceback), and nothing it touches is changed; crafted Inception weights run no code."""

import decimal
import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from conftest import st
from faults_util import damaged, raw, refused, snapshot
from PIL import Image

from stcli.components import metrics
from stcli.components.truncation import Power
from stcli.infra.errors import UserError
from stcli.jobs.train import StepBatches

# --- damaged or foreign checkpoints: every reader, one validation path -------------------------


def _kinds(src, tmp):
    """name -> (damaged checkpoint, message expected from every reader)."""
    t, m = raw(src)
    weight = next(k for k in t if k.startswith("ema.") and t[k].dim() == 4)
    wrong = {weight: torch.zeros(1, *t[weight].shape[1:]),
             "model." + weight[4:]: torch.zeros(1, *t[weight].shape[1:])}
    tmp.mkdir(parents=True, exist_ok=True)
    cut = tmp / "cut.safetensors"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    foreign = tmp / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(foreign))
    return {
        "no recipe": (damaged(src, tmp / "a.safetensors", drop_meta=["recipe"]), "holds no recipe"),
        "truncated recipe JSON": (damaged(src, tmp / "b.safetensors",
                                          meta={"recipe": m["recipe"][: len(m["recipe"]) // 2]}),
                                  "its metadata 'recipe' is not valid JSON"),
        "non-integer step": (damaged(src, tmp / "c.safetensors", meta={"step": "2.5"}),
                             "its step 2.5 is not a non-negative integer"),
        "text step": (damaged(src, tmp / "d.safetensors", meta={"step": json.dumps("two")}),
                      "its step 'two' is not a non-negative integer"),
        "wrong shape": (damaged(src, tmp / "e.safetensors", tensors=wrong),
                        "does not match its recipe's net"),
        "truncated file": (cut, "is corrupt or truncated"),
        "foreign file": (foreign, "is not an st checkpoint"),
    }


TRAIN_ONLY = {
    "missing optimizer tensor": (dict(drop=["optim.0.exp_avg"]),
                                 "lacks the optimizer tensor optim.0.exp_avg"),
    "optimizer tensor of the wrong shape": (dict(tensors={"optim.1.exp_avg_sq": torch.zeros(3, 3, 3)}),
                                            "optim.1.exp_avg_sq has shape (3, 3, 3)"),
    "missing RNG state": (dict(drop=["rng.cpu"]), "holds no CPU RNG state"),
    "RNG state of the wrong size": (dict(tensors={"rng.cpu": torch.zeros(7, dtype=torch.uint8)}),
                                    "its RNG state cannot be restored"),
    "missing optimizer settings": (dict(drop_meta=["optim_groups"]), "optimizer settings"),
}


def test_damaged_checkpoints_are_refused_by_every_reader(tiny_ckpt, tiny_recipe, tmp_path, capsys):
    kinds = _kinds(tiny_ckpt, tmp_path / "bad")
    for name, (path, message) in kinds.items():
        before = path.read_bytes()
        out = tmp_path / f"samples-{name}"
        refused(st(capsys, "sample", path, "-n", 2, "--out", out, "--device", "cpu"), message)
        assert not out.exists(), name
        refused(st(capsys, "nll", path, "--limit", 2, "--device", "cpu"), message)
        refused(st(capsys, "diagnose", path, "--limit", 2, "--points", 2, "--samples", 2,
                   "--device", "cpu", "--out", tmp_path / "diag"), message)
        assert path.read_bytes() == before
    extra = {name: (damaged(tiny_ckpt, tmp_path / "bad" / f"t{i}.safetensors", **change), message)
             for i, (name, (change, message)) in enumerate(TRAIN_ONLY.items())}
    for name, (path, message) in {**kinds, **extra}.items():
        recipe = tiny_recipe("victim")
        run = tmp_path / "victim"
        run.mkdir(exist_ok=True)
        (run / "ckpt.safetensors").write_bytes(path.read_bytes())
        before = snapshot(run)
        refused(st(capsys, "train", recipe, "--resume", "train.steps=4"), message)
        assert snapshot(run) == before, name  # no recipe.yaml, no log, no lock left
    refused(st(capsys, "fid", kinds["no recipe"][0], "--feature-extractor", "st-random-64"),
            "is not an st checkpoint")


# --- corrupt images ---------------------------------------------------------------------------


def _folder_recipe(tiny_recipe, tmp_path, **data):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    recipe = tiny_recipe("run", train={"steps": 12, "batch_size": 4, "ckpt_every": 100})
    spec = yaml.safe_load(recipe.read_text())
    spec["data"] = {"name": "folder", "root": str(images), "image_size": 8, "random_flip": False,
                    "dequantization": "uniform", **data}
    recipe.write_text(yaml.safe_dump(spec))
    return images, recipe


def test_a_corrupt_image_in_the_first_batch_leaves_no_run_folder(tiny_recipe, tmp_path, capsys):
    """The first batch is read before the run folder is made: refused, nothing written."""
    images, recipe = _folder_recipe(tiny_recipe, tmp_path)
    victim = sorted(images.iterdir())[next(StepBatches(24, 4, None, 3, 0).global_batches())[0].item()]
    victim.write_bytes(victim.read_bytes()[:60])
    refused(st(capsys, "train", recipe), f"cannot read the image {victim}")
    assert not (tmp_path / "run").exists()


def test_a_corrupt_image_met_mid_epoch_is_named_after_a_checkpoint(tiny_recipe, tmp_path, capsys):
    images, recipe = _folder_recipe(tiny_recipe, tmp_path)
    order = StepBatches(24, 4, None, 3, 0).global_batches()
    next(order)
    victim = sorted(images.iterdir())[next(order)[1].item()]  # read at step 2
    victim.write_bytes(victim.read_bytes()[:60])  # pixel data cut: the header (read at load) is whole
    refused(st(capsys, "train", recipe), f"cannot read the image {victim}",
            "stopped after step 1, checkpoint saved to")
    ckpt = tmp_path / "run" / "ckpt.safetensors"
    from stcli.infra import checkpoint

    assert checkpoint.load(ckpt)[1]["step"] == 1
    victim.unlink()  # with the file gone (23 images) the data differs from the checkpoint's:
    refused(st(capsys, "train", recipe, "--resume", "train.steps=3"), "24 items then, 23 now",
            "pass --data-changed if the change is meant")
    code, out, err = st(capsys, "train", recipe, "--resume", "train.steps=3", "--data-changed")
    assert code == 0, err  # ... which --data-changed accepts, saying so
    assert "resuming as --data-changed asks" in out + err
    assert checkpoint.load(ckpt)[1]["data"]["items"] == 23


def test_a_corrupt_image_in_memory_is_named_before_anything_is_written(tiny_recipe, tmp_path, capsys):
    images, recipe = _folder_recipe(tiny_recipe, tmp_path, in_memory=True)
    (images / "07.png").write_bytes(b"not an image at all")
    refused(st(capsys, "train", recipe), f"cannot read the image {images / '07.png'}")
    assert not (tmp_path / "run").exists()


def test_a_damaged_sample_image_is_drawn_again(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "s"
    assert st(capsys, "sample", tiny_ckpt, "-n", 4, "--out", out, "--device", "cpu")[0] == 0
    good = snapshot(out)
    victim = out / "000000" / "000002.png"
    victim.write_bytes(good["000000/000002.png"][:40])  # cut by a crash or a full disk
    (out / "grid.png").unlink()
    code, stdout, err = st(capsys, "sample", tiny_ckpt, "-n", 4, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "1 image(s)" in stdout and "damaged" in stdout and "drawing them again" in stdout
    assert snapshot(out) == good


# --- recipes ------------------------------------------------------------------------------------


def test_recipe_files_that_are_not_yaml_text(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    refused(st(capsys, "recipe", "validate", latin), f"recipe {latin} is not UTF-8 text")
    binary = tmp_path / "model.safetensors"
    binary.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}\x00\x00")
    refused(st(capsys, "train", binary), f"recipe {binary} is a binary file")
    refused(st(capsys, "recipe", "validate", tmp_path), f"recipe {tmp_path} is a folder, not a YAML file")
    refused(st(capsys, "train", tmp_path), f"{tmp_path} is a folder without recipe.yaml, not a run "
            "folder of st train")  # st train accepts run folders


def test_a_repeated_yaml_key_is_refused(tiny_recipe, capsys):
    path = tiny_recipe()
    text = path.read_text()
    path.write_text(text + "net:\n  name: unet\n  nf: 16\n")  # a second `net:` section
    refused(st(capsys, "recipe", "validate", path), "key 'net' appears twice")
    refused(st(capsys, "recipe", "validate", tiny_recipe("b"), "optim={lr: 1, lr: 2}"),
            "key 'lr' appears twice")


@pytest.mark.parametrize("name", ["../outside", "a/b", "..", ".", "", "  ", "a\\b"])
def test_a_run_name_that_is_not_one_folder_name_is_refused(tiny_recipe, tmp_path, capsys, name):
    path = tiny_recipe()
    data = yaml.safe_load(path.read_text())
    data["name"] = name
    data["train"].pop("out_dir")
    path.write_text(yaml.safe_dump(data))
    refused(st(capsys, "train", path), "name:", "without path separators")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_validate_refuses_a_net_that_train_would_reject(tiny_recipe, capsys):
    path = tiny_recipe()
    refused(st(capsys, "recipe", "validate", path, "net.ch_mult=[1, 2, 2, 2, 2, 2, 2]"),
            "net: net 'unet' with 7 levels", "needs image height and width divisible by 64")
    refused(st(capsys, "recipe", "show", path, "net.attn_resolutions=[3]"), "attn_resolutions [3]")
    code, out, _ = st(capsys, "recipe", "validate", path)
    assert code == 0 and "valid" in out


def test_devices_are_checked_against_this_machine(tiny_recipe, tiny_ckpt, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    refused(st(capsys, "recipe", "validate", tiny_recipe(), "train.device=tpu"), "train.device:")
    refused(st(capsys, "train", tiny_recipe("gpu"), "train.device=cuda"),
            "device 'cuda': this machine has no CUDA GPU")
    assert not (tmp_path / "gpu").exists()
    for command in (["sample", tiny_ckpt, "-n", 1, "--out", tmp_path / "s"], ["nll", tiny_ckpt],
                    ["diagnose", tiny_ckpt, "--out", tmp_path / "d"]):
        refused(st(capsys, *command, "--device", "cuda:1"), "device 'cuda:1': this machine has no "
                "CUDA GPU")
        refused(st(capsys, *command, "--device", "tpu"), "device 'tpu' is not one of auto, cpu")
    assert not (tmp_path / "s").exists() and not (tmp_path / "d").exists()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    refused(st(capsys, "nll", tiny_ckpt, "--device", "cuda:2"), "this machine has 2 CUDA GPU(s)")


# --- power truncation with a large k --------------------------------------------------------


def power_cdf_reference(k: float, eps: float, T: float, t: float) -> float:
    """F_k(t) = (t^(1-k) - eps^(1-k)) / (T^(1-k) - eps^(1-k)) (log ratio for k = 1), in
    60-digit decimal arithmetic, where no power overflows."""
    with decimal.localcontext() as ctx:
        ctx.prec = 60
        d = decimal.Decimal
        if k == 1.0:
            return float((d(t) / d(eps)).ln() / (d(T) / d(eps)).ln())
        c = d(1) - d(k)
        return float((d(t) ** c - d(eps) ** c) / (d(T) ** c - d(eps) ** c))


@pytest.mark.parametrize("k", [0.0, 0.5, 1.0, 1.5, 62.0, 200.0])
def test_power_truncation_in_log_space_matches_its_closed_form(k):
    """The CDF against exact decimal arithmetic (k = 62 overflowed doubles before), and draws
    distributed by it (Kolmogorov-Smirnov bound at the 1% level, 4000 draws)."""
    eps, T = 1e-5, 1.0
    p = Power(k=k, eps=eps)
    t = [1e-5, 1.00001e-5, 1.0001e-5, 1e-4, 1e-2, 0.5, 1.0]
    exact = [power_cdf_reference(k, eps, T, v) for v in t]
    assert p.cdf(torch.tensor(t, dtype=torch.float64)).tolist() == pytest.approx(exact, rel=1e-9,
                                                                                 abs=1e-12)
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([p.sample(g) for _ in range(4000)], dtype=torch.float64)
    assert bool((draws >= eps).all() and (draws <= T).all())
    u = p.cdf(draws.sort().values)
    ecdf = torch.arange(1, 4001, dtype=torch.float64) / 4000
    assert float((u - ecdf).abs().max()) < 1.63 / math.sqrt(4000)


def test_power_truncation_with_infinite_k_is_refused(tiny_recipe, capsys):
    refused(st(capsys, "recipe", "validate", tiny_recipe(), "truncation.k=.inf"), "truncation.k")
    code, _, err = st(capsys, "train", tiny_recipe("big_k"), "truncation.k=80", "train.steps=2")
    assert code == 0, err


# --- evaluation options ---------------------------------------------------------------------


@pytest.mark.parametrize("option,value,message", [
    ("--rtol", "-1", "must be a positive number"), ("--atol", "-1", "must be a positive number"),
    ("--rtol", "0", "must be a positive number"), ("--atol", "nan", "nan is not a finite number")])
def test_nll_tolerances_must_be_positive(tiny_ckpt, capsys, option, value, message):
    refused(st(capsys, "nll", tiny_ckpt, option, value, "--device", "cpu"), f"{option} ", message)


def test_diagnose_out_is_checked_before_computing(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from stcli.jobs import diagnose

    def never(*args, **kwargs):
        raise AssertionError("computed before checking --out")

    monkeypatch.setattr(diagnose, "diagnose", never)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    refused(st(capsys, "diagnose", tiny_ckpt, "--out", blocker),
            f"--out {blocker} exists and is not a folder")
    refused(st(capsys, "diagnose", tiny_ckpt, "--out", blocker / "sub"), f"{blocker} is not a folder")
    readonly = tmp_path / "ro"
    from faults_util import mount_tmpfs, unmount

    mounted = mount_tmpfs(readonly, 4096, readonly=True)
    try:
        if not mounted:  # not root: a folder without write permission does the same
            readonly.mkdir(exist_ok=True)
            readonly.chmod(0o500)
        if not os.access(readonly, os.W_OK):
            refused(st(capsys, "diagnose", tiny_ckpt, "--out", readonly / "d"), "is not writable")
        else:  # root on a machine without mount: the check is the same function
            monkeypatch.setattr(diagnose.os, "access", lambda *a: False)
            refused(st(capsys, "diagnose", tiny_ckpt, "--out", readonly / "d"), "is not writable")
    finally:
        if mounted:
            unmount(readonly)


# --- crafted Inception weights ------------------------------------------------------------------


class Payload:
    """Unpickling this calls os.mkdir(marker): code run by a weights file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_crafted_inception_weights_run_no_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(1), "evil": Payload(marker)}, crafted)
    assert not marker.exists()
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload does work when unpickled
    assert marker.exists()
    marker.rmdir()
    images = tmp_path / "images"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    flat = refused(st(capsys, "fid-ref", images, "--out", tmp_path / "stats.safetensors",
                      "--inception-weights", crafted, "--device", "cpu",
                      "--cache-dir", tmp_path / "cache"),
                   f"the Inception weights {crafted} have SHA-256", "not that of the published "
                   "weights (6726825d...)", "refusing to load them")
    assert metrics.sha256(crafted) in flat
    assert not marker.exists() and not (tmp_path / "stats.safetensors").exists()
    with pytest.raises(UserError, match="as plain tensors"):  # even past the digest check
        metrics.load_inception_state(crafted, check_digest=False)
    assert not marker.exists()


def test_plain_inception_state_dicts_load_as_tensors_only(tmp_path):
    state = {"fc.weight": torch.randn(3, 2), "fc.bias": torch.randn(3)}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    got = metrics.load_inception_state(path, check_digest=False)
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    torch.save([1, 2], path)
    with pytest.raises(UserError, match="not a state dict of tensors"):
        metrics.load_inception_state(path, check_digest=False)


def test_loads_inside_weights_only_loads_run_no_code_even_when_asked_to(tmp_path, monkeypatch):
    """torch-fidelity calls torch.load(path, weights_only=False) on the Inception weights."""
    marker, path = tmp_path / "pwned", tmp_path / "w.pth"
    torch.save({"fc.weight": torch.ones(2), "evil": Payload(marker)}, path)
    torch.save({"fc.weight": torch.ones(2)}, tmp_path / "plain.pth")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting: lifted inside
    with metrics.weights_only_loads():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=False)
        assert torch.equal(torch.load(tmp_path / "plain.pth", weights_only=False)["fc.weight"],
                           torch.ones(2))
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_damaged_npz_of_samples_is_drawn_again(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "n"
    args = ("sample", tiny_ckpt, "-n", 3, "--out", out, "--device", "cpu", "--format", "npz")
    assert st(capsys, *args)[0] == 0
    good = (out / "samples.npz").read_bytes()
    (out / "samples.npz").write_bytes(good[: len(good) // 3])
    code, _, err = st(capsys, *args)
    assert code == 0, err
    assert (out / "samples.npz").read_bytes() == good
