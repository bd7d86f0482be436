"""Running st train as a cluster user does: out-of-memory messages, batch_per_device,
checkpoint permissions and retention, --resume auto, data.channels."""

import json
import os
import shutil
import stat

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

import stcli.jobs.train as train_mod
from stcli.components.recipe import load_recipe
from stcli.infra.errors import UserError
from stcli.jobs.cli import _resume_auto as main_resume_auto
from stcli.jobs.cli import main
from stcli.jobs.sample import generate
from stcli.jobs.train import train


def st(*args) -> int:
    """Run `st ARGS` in this process; the exit code."""
    try:
        main([str(a) for a in args])
    except SystemExit as exit_:
        return exit_.code or 0
    return 0


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory")])
def test_out_of_memory_is_one_message_with_the_settings_and_what_to_change(
        tiny_recipe, monkeypatch, capsys, error):
    real, calls = train_mod.Trainer.train_step, []

    def fails_at_step_2(self, *args, **kwargs):
        calls.append(self.step)
        if self.step == 1:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.Trainer, "train_step", fails_at_step_2)
    path = tiny_recipe("oom", train={"micro_batches": 2, "ckpt_every": 1})
    assert st("train", path) == 2 and calls == [0, 1]
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for part in ("out of memory on cpu at step 2", "train.batch_size=16 over 1 process(es)",
                 "train.micro_batches=2 pass(es) of 8 images", "train.precision=fp32",
                 "train.batch_per_device=4", "train.precision=bf16", "checkpoint"):
        assert part in " ".join(err.split()), (part, err)


def test_other_runtime_errors_are_not_disguised_as_out_of_memory(tiny_recipe, monkeypatch):
    def fails(self, *args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(train_mod.Trainer, "train_step", fails)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(load_recipe(tiny_recipe("other")))


def test_batch_per_device_sets_the_micro_batches(tiny_recipe, tiny_ckpt_shared):
    by_count = train(load_recipe(tiny_recipe("count", train={"steps": 2, "micro_batches": 4})))
    by_size = train(load_recipe(tiny_recipe("size", train={"steps": 2, "batch_per_device": 4})))
    a = load_file(by_count.out_dir / "ckpt.safetensors")
    b = load_file(by_size.out_dir / "ckpt.safetensors")
    c = load_file(tiny_ckpt_shared)  # the same recipe in one pass
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.startswith("model."))  # 4 passes differ


@pytest.mark.parametrize("train_section,message", [
    ({"batch_per_device": 5}, "train.batch_per_device=5 must divide the batch of each process"),
    ({"batch_per_device": 4, "micro_batches": 2}, "train.micro_batches=2 contradicts "
                                                  "train.batch_per_device=4")])
def test_bad_batch_per_device_is_one_message(tiny_recipe, capsys, train_section, message):
    path = tiny_recipe("bad", train=train_section)
    assert st("train", path) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert not (path.parent / "bad" / "ckpt.safetensors").exists()


@pytest.mark.parametrize("umask,mode", [(0o027, 0o640), (0o022, 0o644)])
def test_checkpoints_are_readable_as_the_umask_allows(tiny_recipe, umask, mode):
    old = os.umask(umask)
    try:
        run = train(load_recipe(tiny_recipe("perm", train={"steps": 2, "snapshot_every": 1})))
    finally:
        os.umask(old)
    for name in ("ckpt.safetensors", "ckpt-1.safetensors", "ckpt-2.safetensors"):
        assert stat.S_IMODE((run.out_dir / name).stat().st_mode) == mode, name


def test_keep_last_and_ema_only_snapshots(tiny_recipe, tmp_path):
    run = train(load_recipe(tiny_recipe("keep", train={
        "steps": 5, "snapshot_every": 1, "keep_last": 2, "snapshot_weights": "ema"})))
    assert sorted(p.name for p in run.out_dir.glob("ckpt-*")) == ["ckpt-4.safetensors",
                                                                 "ckpt-5.safetensors"]
    full, snap = (load_file(run.out_dir / n) for n in ("ckpt.safetensors", "ckpt-5.safetensors"))
    ema = {k: v for k, v in full.items() if k.startswith("ema.")}
    assert snap.keys() == ema.keys() and all(torch.equal(snap[k], ema[k]) for k in ema)
    assert sum(v.numel() for v in snap.values()) < sum(v.numel() for v in full.values()) / 3
    out = generate(run.out_dir / "ckpt-5.safetensors", 2, tmp_path / "s", device="cpu")
    ref = generate(run.out_dir / "ckpt.safetensors", 2, tmp_path / "r", device="cpu")
    assert [p.read_bytes() for p in sorted(out.glob("0*/*.png"))] == \
        [p.read_bytes() for p in sorted(ref.glob("0*/*.png"))]
    # an EMA-only snapshot cannot be resumed: one message naming why
    shutil.copy(run.out_dir / "ckpt-5.safetensors", run.out_dir / "ckpt.safetensors")
    with pytest.raises(UserError, match="EMA weights only"):  # keep_last etc. may change
        train(load_recipe(tiny_recipe("keep", train={"steps": 6, "snapshot_every": 1})), resume=True)


def test_resume_auto_starts_afresh_then_resumes(tiny_recipe, capsys):
    full = train(load_recipe(tiny_recipe("full", train={"steps": 4})))
    path = tiny_recipe("auto", train={"steps": 2})
    assert st("train", path, "--resume", "auto") == 0
    assert "no checkpoint" in capsys.readouterr().out
    assert st("train", path, "--resume", "auto", "train.steps=4") == 0
    assert "resuming" in capsys.readouterr().out
    a = load_file(full.out_dir / "ckpt.safetensors")
    b = load_file(path.parent / "auto" / "ckpt.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed, not restarted: bit-exact
    # a corrupt checkpoint is an error and stays for inspection, never a fresh start
    ckpt = path.parent / "auto" / "ckpt.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    damaged = ckpt.read_bytes()
    assert st("train", path, "--resume=auto", "train.steps=6") == 2
    err = capsys.readouterr().err
    assert "corrupt or truncated" in err and "Traceback" not in err and ckpt.read_bytes() == damaged
    # a plain --resume flag followed by an override keeps its meaning
    assert main_resume_auto(["train", "r.yaml", "--resume", "train.steps=3"]) == \
        ["train", "r.yaml", "--resume", "train.steps=3"]


def test_resume_auto_refuses_a_folder_of_snapshots_only(tiny_recipe, capsys):
    path = tiny_recipe("snaps", train={"steps": 2, "snapshot_every": 1})
    assert st("train", path) == 0
    (path.parent / "snaps" / "ckpt.safetensors").unlink()
    assert st("train", path, "--resume", "auto", "train.steps=3") == 2
    assert "holds snapshots (ckpt-2.safetensors, ...) but no ckpt.safetensors" in \
        " ".join(capsys.readouterr().err.split())


def write_images(root, mode: str, n: int = 20, size: int = 8):
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        shape = (size, size) if mode == "L" else (size, size, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / f"{i}.png")
    return root


def folder_recipe(tiny_recipe, out, root, **data):
    path = tiny_recipe(out, train={"steps": 1})
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] = {"name": "folder", "root": str(root), "image_size": 8, **data}
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_a_folder_of_grayscale_images_trains_a_one_channel_model(tiny_recipe, tmp_path):
    from PIL import Image

    gray = write_images(tmp_path / "gray", "L")
    rgb = write_images(tmp_path / "rgb", "RGB")
    mixed = write_images(tmp_path / "mixed", "L")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "colour.png")
    for root, channels, expected in [(gray, "auto", 1), (rgb, "auto", 3), (mixed, "auto", 3),
                                     (rgb, 1, 1), (gray, 3, 3)]:
        recipe = load_recipe(folder_recipe(tiny_recipe, f"{root.name}-{channels}", root,
                                           channels=channels))
        assert recipe.data.shape == (expected, 8, 8)
        first = recipe.data.create("train")[0]
        assert first.shape == (expected, 8, 8) and first.dtype == torch.uint8
        if root is gray:  # the pixels as stored, whatever the number of channels
            stored = torch.from_numpy(np.array(Image.open(gray / "0.png")))
            assert all(torch.equal(c, stored) for c in first)
    run = train(load_recipe(folder_recipe(tiny_recipe, "gray-run", gray)))
    ckpt = run.out_dir / "ckpt.safetensors"
    saved = json.loads(safe_open(str(ckpt), "pt").metadata()["recipe"])
    assert saved["data"]["channels"] == 1  # resolved: sampling needs no data folder
    shutil.rmtree(gray)
    out = generate(ckpt, 2, tmp_path / "samples", device="cpu")
    assert Image.open(out / "000000" / "000000.png").mode == "L"


def test_bad_channels_value_is_one_message(tiny_recipe, tmp_path, capsys):
    path = folder_recipe(tiny_recipe, "bad", write_images(tmp_path / "g", "L"), channels=2)
    assert st("train", path) == 2
    err = capsys.readouterr().err
    assert "channels" in err and "Traceback" not in err
