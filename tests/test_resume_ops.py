"""Resuming as a cluster user does: `st train runs/NAME`, run settings that may change on
resume (and those that may not), fp16 with a loss scaler, the default data-loader workers."""

import json
import math
import shutil

import pytest
import torch
import yaml
from conftest import st
from safetensors import safe_open
from safetensors.torch import load_file

import stcli.jobs.train as train_mod
from stcli.components.recipe import load_recipe
from stcli.infra import checkpoint
from stcli.infra.errors import UserError
from stcli.jobs import resources
from stcli.jobs.resources import default_workers, resolve_workers
from stcli.jobs.train import train


def same_checkpoints(a, b, prefixes=("model.", "ema.", "optim.")) -> None:
    ta, tb = load_file(a), load_file(b)
    keys = [k for k in ta if k.startswith(prefixes)]
    assert keys and sorted(keys) == sorted(k for k in tb if k.startswith(prefixes))
    for k in keys:
        assert torch.equal(ta[k], tb[k]), k


def log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def meta(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return {k: json.loads(v) for k, v in f.metadata().items() if k != "format"}


def test_run_folder_resumes_from_its_recipe_wherever_it_now_lies(tiny_recipe, tmp_path, capsys):
    full = train(load_recipe(tiny_recipe("full", train={"steps": 4})))
    path = tiny_recipe("part", train={"steps": 2})
    assert st(capsys, "train", path)[0] == 0
    moved = tmp_path / "moved"  # the recipe.yaml inside still names the old train.out_dir
    shutil.move(path.parent / "part", moved)
    code, out, err = st(capsys, "train", moved, "train.steps=4", "train.log_every=2")
    assert code == 0, err
    assert not (path.parent / "part").exists()
    same_checkpoints(full.out_dir / "ckpt.safetensors", moved / "ckpt.safetensors")  # bit-exact
    assert [r["step"] for r in log(moved)] == [1, 2, 4]
    assert yaml.safe_load((moved / "recipe.yaml").read_text())["train"]["out_dir"] == str(moved)


def test_run_folder_refuses_overrides_that_change_the_trajectory(tiny_recipe, capsys):
    path = tiny_recipe("run", train={"steps": 2})
    assert st(capsys, "train", path)[0] == 0
    folder = path.parent / "run"
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for override, named in (("net.nf=16", "net.nf"), ("train.batch_size=32", "train.batch_size"),
                            ("train.precision=bf16", "train.precision"),
                            ("train.out_dir=elsewhere", "train.out_dir"), ("seed=4", "seed")):
        code, _, err = st(capsys, "train", folder, "train.steps=4", override)
        err = " ".join(err.split())
        assert code == 2 and "Traceback" not in err
        assert f"{named} cannot be overridden when resuming the run folder" in err, err
        assert "train.micro_batches" in err and "train.sample_every" in err  # what may change
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before


def test_run_folder_bad_input(tiny_recipe, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = st(capsys, "train", tmp_path / "empty")
    assert code == 2 and "without recipe.yaml, not a run folder" in " ".join(err.split())
    path = tiny_recipe("run", train={"steps": 2})
    assert st(capsys, "train", path)[0] == 0
    folder = path.parent / "run"
    code, _, err = st(capsys, "train", folder, "train.steps")  # not key=value
    assert code == 2 and "not of the form key.path=value" in err
    ckpt = folder / "ckpt.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    damaged = ckpt.read_bytes()
    for flags in ([], ["--resume", "auto"]):
        code, _, err = st(capsys, "train", folder, "train.steps=4", *flags)
        assert code == 2 and "corrupt or truncated" in err and "Traceback" not in err
        assert ckpt.read_bytes() == damaged  # kept for inspection, never a fresh start
    (folder / "recipe.yaml").write_text("name: [unclosed")
    code, _, err = st(capsys, "train", folder, "train.steps=4")
    assert code == 2 and "is not valid YAML" in err


def test_run_folder_without_a_checkpoint(tiny_recipe, tmp_path, capsys):
    """Only --resume auto starts afresh from the folder's recipe.yaml (a requeued job whose first
    run died before its first checkpoint); a plain `st train RUN_DIR` says there is nothing."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    shutil.copy(tiny_recipe("elsewhere"), folder / "recipe.yaml")
    code, _, err = st(capsys, "train", folder, "train.steps=1")
    assert code == 2 and "nothing to resume" in err and not (folder / "log.jsonl").exists()
    code, out, err = st(capsys, "train", folder, "--resume", "auto", "train.steps=1")
    assert code == 0 and "starting afresh" in out, err
    assert meta(folder / "ckpt.safetensors")["step"] == 1
    assert not (tmp_path / "elsewhere").exists()  # the folder, not the recipe's train.out_dir


def test_run_settings_may_change_on_resume_the_trajectory_may_not(tiny_recipe, capsys):
    """micro_batches / batch_per_device (the same global batch), cadences and workers are
    accepted; the step's schedule (tau, learning rate) carries on as in an unbroken run."""
    full = train(load_recipe(tiny_recipe("full")))
    path = tiny_recipe("part", train={"steps": 3})
    assert st(capsys, "train", path)[0] == 0
    for override, named in (("train.batch_size=32", "train.batch_size"),
                            ("train.precision=fp16", "train.precision"), ("train.ema=0.9", "train.ema")):
        code, _, err = st(capsys, "train", path, "--resume", "train.steps=6", override)
        assert code == 2 and "the recipe differs" in err and named in err, err
    code, _, err = st(capsys, "train", path, "--resume", "train.steps=5", "train.micro_batches=2",
                      "train.sample_every=5", "train.ckpt_every=1", "train.log_every=2",
                      "train.workers=0", "train.grid_size=2")
    assert code == 0, err
    folder = path.parent / "part"
    code, _, err = st(capsys, "train", folder, "train.steps=6", "train.batch_per_device=4")
    assert code == 0, err
    steps, ref = log(folder), {r["step"]: r for r in log(full.out_dir)}
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(r["tau_mean"] == ref[r["step"]]["tau_mean"] and r["lr"] == ref[r["step"]]["lr"] for r in steps)
    assert all(math.isfinite(r["loss"]) for r in steps)
    assert (folder / "samples" / "grid-5.png").is_file()
    assert meta(folder / "ckpt.safetensors")["step"] == 6
    # the passes differ (noise keyed by micro-batch), so the weights are not those of `full`
    a, b = load_file(full.out_dir / "ckpt.safetensors"), load_file(folder / "ckpt.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("model."))


# --- fp16 with a loss scaler --------------------------------------------------------------

FP16 = {"train": {"precision": "fp16", "steps": 4, "ckpt_every": 2},
        "net": {"dropout": 0.0}}  # no dropout: redone attempts draw none


def test_fp16_overflowed_attempts_leave_no_trace(tiny_recipe, monkeypatch):
    """From a loss scale far too high, the first step overflows until the scaler has halved
    the scale enough.  Those attempts update neither Adam nor the EMA nor the step count: the
    run ends bit-identical to one that started at the scale the first was left with."""
    ema_updates = []
    real_ema = train_mod.Trainer.update_ema
    monkeypatch.setattr(train_mod.Trainer, "update_ema",
                        lambda self: (ema_updates.append(self.step), real_ema(self))[1])
    monkeypatch.setattr(train_mod, "INITIAL_LOSS_SCALE", 2.0**18)
    high = train(load_recipe(tiny_recipe("high", **FP16)))
    records = log(high.out_dir)
    skipped, scale = records[0]["skipped_steps"], records[0]["loss_scale"]
    assert skipped >= 1 and scale == 2.0**18 / 2**skipped  # halved once per redone attempt
    assert ema_updates == list(range(4)) and [r["step"] for r in records] == list(range(1, 5))
    ckpt = high.out_dir / "ckpt.safetensors"
    assert int(load_file(ckpt)["optim.0.step"]) == 4  # Adam counted the good steps only
    assert meta(ckpt)["grad_scaler"]["scale"] == records[-1]["loss_scale"]
    monkeypatch.setattr(train_mod, "INITIAL_LOSS_SCALE", scale)
    low = train(load_recipe(tiny_recipe("low", **FP16)))
    assert log(low.out_dir)[0]["skipped_steps"] == 0
    same_checkpoints(ckpt, low.out_dir / "ckpt.safetensors")
    assert [r["loss_scale"] for r in log(low.out_dir)] == [r["loss_scale"] for r in records]


def test_fp16_resume_is_bit_exact_with_the_loss_scale_restored(tiny_recipe, monkeypatch):
    monkeypatch.setattr(train_mod, "INITIAL_LOSS_SCALE", 2.0**20)
    full = train(load_recipe(tiny_recipe("full", **FP16)))
    part = tiny_recipe("part", **FP16)
    train(load_recipe(part, ["train.steps=2"]))
    monkeypatch.setattr(train_mod, "INITIAL_LOSS_SCALE", 2.0**30)  # must not matter on resume
    train(load_recipe(part), resume=True)
    same_checkpoints(full.out_dir / "ckpt.safetensors", part.parent / "part" / "ckpt.safetensors")
    assert [r["loss_scale"] for r in log(full.out_dir)] == \
        [r["loss_scale"] for r in log(part.parent / "part")]
    ckpt = part.parent / "part" / "ckpt.safetensors"  # without its scaler state: damaged
    tensors, info = checkpoint.load(ckpt)
    checkpoint.save(ckpt, tensors, {k: v for k, v in info.items() if k != "grad_scaler"})
    with pytest.raises(UserError, match="damaged: it holds no valid fp16 loss scaler state"):
        train(load_recipe(part, ["train.steps=5"]), resume=True)


def test_fp16_gradients_that_never_become_finite_stop_the_run(tiny_recipe, monkeypatch):
    """Gradients made infinite at every attempt of step 3: the scale halves down to below 1,
    then the run stops with the last checkpoint (step 2) untouched."""
    monkeypatch.setattr(train_mod, "INITIAL_LOSS_SCALE", 4.0)
    real, attempts = train_mod.Trainer.optimizer_step, []

    def poisoned(self):
        if self.step == 2:
            attempts.append(self.scaler.get_scale())
            next(self.model.parameters()).grad.view(-1)[0] = float("inf")
        return real(self)

    monkeypatch.setattr(train_mod.Trainer, "optimizer_step", poisoned)
    path = tiny_recipe("inf", net=FP16["net"], train={"precision": "fp16", "ckpt_every": 2})
    before = {}
    with pytest.raises(UserError, match=r"step 3 \(loss scale 1 could not make the gradients "
                                        r"finite; .* untouched"):
        try:
            train(load_recipe(path))
        finally:
            before["step"] = meta(path.parent / "inf" / "ckpt.safetensors")["step"]
    assert before["step"] == 2 and attempts == [4.0, 2.0, 1.0]


def test_fp16_and_the_finite_weights_guard(tiny_recipe):
    """An update that makes the weights non-finite (huge learning rate) is still caught before
    any checkpoint is written, fp16 or not."""
    path = tiny_recipe("huge", net=FP16["net"], optim={"lr": 1e39, "warmup": 0},
                       train={"precision": "fp16", "ckpt_every": 1})
    with pytest.raises(UserError, match="the weights after step 1 are not finite"):
        train(load_recipe(path))
    assert not (path.parent / "huge" / "ckpt.safetensors").exists()


# --- data-loader workers --------------------------------------------------------------------

@pytest.mark.parametrize("device,cpus,local,expected", [
    ("cpu", 64, 1, 0), ("cuda", 64, 1, 8), ("cuda", 16, 4, 4), ("cuda", 6, 4, 1), ("cuda", 2, 8, 1)])
def test_default_workers(device, cpus, local, expected):
    assert default_workers(torch.device(device), cpus, local) == expected


def test_workers_resolved_unless_set(tiny_recipe, monkeypatch):
    cfg = load_recipe(tiny_recipe("w")).train
    assert cfg.workers is None
    assert resolve_workers(cfg, torch.device("cpu")).workers == 0
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_workers(cfg, torch.device("cuda")).workers == 6
    explicit = load_recipe(tiny_recipe("w3", train={"workers": 3})).train
    assert resolve_workers(explicit, torch.device("cuda")).workers == 3
    assert resolve_workers(explicit, torch.device("cpu")).workers == 3


def test_resume_refuses_other_training_data(tiny_recipe, tmp_path, monkeypatch, capsys):
    """A relative data.root is read from the working directory: resuming from another one read
    other images without a word. The checkpoint records the data's digest (item count and
    the hash of three items); a resume that reads other data is refused, the same data is not."""
    from PIL import Image

    def folder(where, shades):
        (where / "imgs").mkdir(parents=True)
        for i, shade in enumerate(shades):
            Image.new("RGB", (8, 8), (shade, 255 - shade, 3 * i)).save(where / "imgs" / f"{i}.png")

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    folder(a, range(0, 200, 10))
    folder(b, [255] * 20)  # the same count, other contents
    folder(c, range(0, 210, 10))  # one image more
    data = {"name": "folder", "root": "imgs", "image_size": 8}
    path = tiny_recipe("run", train={"steps": 2, "batch_size": 4})
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "data": data}))
    monkeypatch.chdir(a)
    code, _, err = st(capsys, "train", path)
    assert code == 0, err
    run = path.parent / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    for where, change in ((b, "the same count, other contents"), (c, "20 items then, 21 now")):
        monkeypatch.chdir(where)
        code, _, err = st(capsys, "train", run, "train.steps=4")
        err = " ".join(err.split())
        assert code == 2 and "Traceback" not in err, err
        assert f"the train data differs from what {run / 'ckpt.safetensors'} was trained on: {change}" \
            in err and f"is {where / 'imgs'}" in err, err
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    monkeypatch.chdir(a)
    assert st(capsys, "train", run, "train.steps=4")[0] == 0
    assert meta(run / "ckpt.safetensors")["data"]["items"] == 20
