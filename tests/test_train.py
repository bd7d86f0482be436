"""Training end to end: checkpoints, exact resume, Ctrl-C, the NaN guard, DDP over gloo."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, run_st
from safetensors.torch import load_file, save_file

from stcli.components.recipe import load_recipe
from stcli.components.stf import ReferenceBatches
from stcli.infra import checkpoint
from stcli.infra.distributed import Context
from stcli.infra.errors import UserError
from stcli.jobs.train import StepBatches, Trainer, train


def tensors(path):
    return load_file(str(path))


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_round_trip_and_damage(tmp_path):
    path = tmp_path / "c.safetensors"
    data = {"model.w": torch.randn(3, 4), "rng.cpu": torch.get_rng_state()}
    checkpoint.save(path, data, {"step": 7, "recipe": {"a": [1, 2]}})
    got, meta = checkpoint.load(path)
    assert_same_tensors(got, data)
    assert meta == {"step": 7, "recipe": {"a": [1, 2]}}
    assert list(tmp_path.iterdir()) == [path]  # no temporary files left behind
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        checkpoint.load(tmp_path / "cut.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="not an st checkpoint"):
        checkpoint.load(tmp_path / "other.safetensors")
    with pytest.raises(UserError, match="does not exist"):
        checkpoint.load(tmp_path / "missing.safetensors")


def test_resume_is_bit_exact(tiny_recipe):
    full = train(load_recipe(tiny_recipe("full")))
    assert full.step == 6
    part = tiny_recipe("part")
    train(load_recipe(part, ["train.steps=4"]))  # stops between two checkpoints
    assert checkpoint.load(part.parent / "part" / "ckpt.safetensors")[1]["step"] == 4
    train(load_recipe(part), resume=True)
    assert_same_tensors(tensors(full.out_dir / "ckpt.safetensors"),
                        tensors(part.parent / "part" / "ckpt.safetensors"))
    log = [json.loads(line) for line in (part.parent / "part" / "log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_recipe_and_an_existing_run(tiny_recipe):
    path = tiny_recipe("run")
    train(load_recipe(path, ["train.steps=1"]))
    with pytest.raises(UserError, match=r"differs .* at: net\.nf"):
        train(load_recipe(path, ["net.nf=16"]), resume=True)
    with pytest.raises(UserError, match="already holds a run"):
        train(load_recipe(path))
    with pytest.raises(UserError, match="nothing to resume"):
        train(load_recipe(path, ["train.out_dir=" + str(path.parent / "empty")]), resume=True)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_recipe, monkeypatch):
    path = tiny_recipe("nan")
    real, ckpt, good = Trainer.train_step, path.parent / "nan" / "ckpt.safetensors", {}

    def poisoned(self, *batches):
        loss, tau = real(self, *batches)
        if self.step == 4:
            good["bytes"] = ckpt.read_bytes()  # the checkpoint of step 3
            loss = loss * float("nan")
        return loss, tau

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(UserError, match="non-finite .* step 5 .* untouched"):
        train(load_recipe(path))
    assert checkpoint.load(ckpt)[1]["step"] == 3
    assert ckpt.read_bytes() == good["bytes"]


def test_cli_train_end_to_end_writes_grid_log_and_checkpoint(tiny_recipe):
    path = tiny_recipe("e2e", train={"sample_every": 6})
    res = run_st("train", path, "train.steps=6")
    assert res.returncode == 0, res.stderr
    out = path.parent / "e2e"
    assert (out / "samples" / "grid-6.png").is_file()
    assert (out / "recipe.yaml").is_file() and (out / "ckpt.safetensors").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").open()]
    assert {"loss", "steps_per_s", "images_per_s", "tau_mean", "tau_q50", "grad_norm", "peak_mem_mb",
            "wall_s"} <= records[-1].keys()
    from PIL import Image

    assert Image.open(out / "samples" / "grid-6.png").size == (102, 102)  # 2x2 of 8px, x6, padded


def test_ctrl_c_writes_a_checkpoint_and_resume_matches(tiny_recipe):
    path = tiny_recipe("sig", train={"steps": 100000, "ckpt_every": 3, "log": ["csv", "tensorboard"]})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "stcli", "train", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    log = path.parent / "sig" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    ckpt = path.parent / "sig" / "ckpt.safetensors"
    k = checkpoint.load(ckpt)[1]["step"]
    assert k >= 5  # after a checkpoint (step 3) and more log windows
    train(load_recipe(path, [f"train.steps={k + 2}"]), resume=True)
    ref = train(load_recipe(tiny_recipe("ref"), [f"train.steps={k + 2}"]))
    assert_same_tensors(tensors(ckpt), tensors(ref.out_dir / "ckpt.safetensors"))
    steps = list(range(1, k + 3))  # each step logged once, in every logger
    assert [json.loads(line)["step"] for line in log.open()] == steps
    with open(log.parent / "log.csv", newline="") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log.parent / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == steps


def test_an_ignored_sigint_stays_ignored(tiny_recipe, monkeypatch):
    """A shell's background job starts with SIGINT ignored: Ctrl-C at the terminal must not stop
    it (as st sample already behaved); SIGTERM still stops the run with a checkpoint."""
    from stcli.jobs.train import Trainer

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = Trainer.__new__(Trainer)
        previous = Trainer._install_signal_handlers(trainer)
        assert set(previous) == {signal.SIGTERM}
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert callable(signal.getsignal(signal.SIGTERM))
        Trainer._restore_signal_handlers(previous)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_unwritable_output_folder(tiny_recipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot write to the output folder"):
        train(load_recipe(tiny_recipe("w"), [f"train.out_dir={blocker}/sub"]))


def test_toy2d_recipe_trains_and_draws_its_samples(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "toy2d_gmm_mlp_vp_st.yaml", [
        "train.steps=4", "train.batch_size=32", "train.sample_every=4", "train.grid_size=256",
        "sample.steps=5", "train.device=cpu", f"train.out_dir={tmp_path / 'toy'}"])
    result = train(recipe)
    assert result.step == 4 and torch.isfinite(torch.tensor(result.loss))
    from PIL import Image

    assert Image.open(tmp_path / "toy" / "samples" / "grid-4.png").size == (128, 128)


def test_load_model_rebuilds_from_the_checkpoint_alone(tiny_ckpt):
    from stcli.components.loading import load_model

    path = tiny_ckpt
    saved = tensors(path)
    ema, raw = load_model(path), load_model(path, weights="raw")
    assert ema.step == 2 and ema.recipe.name == "tiny" and not ema.model.training
    for k, v in ema.model.state_dict().items():
        assert torch.equal(v, saved[f"ema.{k}"]) and torch.equal(raw.model.state_dict()[k],
                                                                  saved[f"model.{k}"])
    # a checkpoint whose recipe does not match its tensors is refused clearly
    t, meta = checkpoint.load(path)
    checkpoint.save(path.parent / "noema.safetensors",
                    {k: v for k, v in t.items() if not k.startswith("ema.")}, meta)
    meta["recipe"]["net"]["nf"] = 16
    checkpoint.save(path.parent / "bad.safetensors", t, meta)
    with pytest.raises(UserError, match="does not match its recipe's net"):
        load_model(path.parent / "bad.safetensors")
    with pytest.raises(UserError, match="no ema weights; use --weights raw"):
        load_model(path.parent / "noema.safetensors")


STF = {"target": {"name": "stf", "reference_batch": 40}}


def test_stf_training_logs_ess_and_resumes_bit_exactly(tiny_recipe):
    full = train(load_recipe(tiny_recipe("full", loss=STF)))
    part = tiny_recipe("part", loss=STF)
    train(load_recipe(part, ["train.steps=4"]))
    train(load_recipe(part), resume=True)
    assert_same_tensors(tensors(full.out_dir / "ckpt.safetensors"),
                        tensors(part.parent / "part" / "ckpt.safetensors"))
    log = [json.loads(line) for line in (full.out_dir / "log.jsonl").open()]
    for record in log:
        ess = record["stf_ess"]
        assert len(ess["sigma"]) == 9 and sum(ess["count"]) == 16  # log_every 1, batch 16
        assert all(1 <= e <= 40 for e in ess["ess"] if e is not None)
    dsm = tensors(train(load_recipe(tiny_recipe("dsm"))).out_dir / "ckpt.safetensors")
    stf = tensors(full.out_dir / "ckpt.safetensors")
    assert not all(torch.equal(dsm[k], stf[k]) for k in dsm if k.startswith("model."))


def test_stf_reference_batch_must_hold_the_batch_and_fit_the_data(tiny_recipe):
    with pytest.raises(UserError, match="reference_batch=8 is smaller than the batch"):
        Trainer(load_recipe(tiny_recipe("small", loss={"target": {"name": "stf",
                                                                   "reference_batch": 8}})),
                Context(0, 1, torch.device("cpu")))
    with pytest.raises(UserError, match="exceeds the .* images of the training set"):
        Trainer(load_recipe(tiny_recipe("big", loss={"target": {"name": "stf",
                                                                 "reference_batch": 10**6}})),
                Context(0, 1, torch.device("cpu")))


@pytest.mark.parametrize("gather", [False, True])
def test_reference_indices_are_distinct_and_exclude_the_batch(gather):
    n, batch, extra, world = 50, 8, 9, 2
    drawn = {}
    for rank in range(world):
        steps = StepBatches(n, batch, Context(rank, world, torch.device("cpu")), seed=1, start=3)
        pairs = zip(steps.global_batches(), ReferenceBatches(steps, extra, gather))
        drawn[rank] = [(b.tolist(), r) for b, r in (next(pairs) for _ in range(10))]
    for step in range(10):
        full = drawn[0][step][0]
        assert full == drawn[1][step][0]
        for rank in range(world):
            ref = drawn[rank][step][1]
            own = full[rank * batch // world:(rank + 1) * batch // world]
            assert len(ref) == extra and len(set(ref)) == extra
            assert not set(ref) & set(full if gather else own)
        if gather:  # the ranks' extras are disjoint: the gathered reference has no repeats
            assert not set(drawn[0][step][1]) & set(drawn[1][step][1])


@pytest.mark.parametrize("warmup", [True, False])
def test_ema_rate_warms_up_like_score_sde(tiny_recipe, warmup):
    """Update n uses rate min(ema, (1 + n)/(10 + n)): from ema = 0 and weights 1, the first
    update gives 1 - 2/11 with warm-up and 1 - 0.999 without."""
    recipe = load_recipe(tiny_recipe("ema"), [f"train.ema_warmup={str(warmup).lower()}"])
    trainer = Trainer(recipe, Context(0, 1, torch.device("cpu")))
    with torch.no_grad():
        for p, q in zip(trainer.model.parameters(), trainer.ema.parameters()):
            p.fill_(1.0)
            q.zero_()
    trainer.update_ema()
    expected = 1 - 2 / 11 if warmup else 1 - 0.999
    for q in trainer.ema.parameters():
        torch.testing.assert_close(q, torch.full_like(q, expected))


@pytest.mark.parametrize("name", ["digits", "toy2d"])
def test_device_batches_are_the_dataloader_batches_bit_for_bit(name):
    """In-memory data held on the device yield, step by step and after the transform (flips,
    dequantisation), exactly the batches of the DataLoader path: across an epoch end, for two
    ranks, from a resumed step, and for a target's extra reference images."""
    from itertools import islice

    from stcli.components.data import Digits, Toy2D
    from stcli.infra.seeding import generator
    from stcli.jobs.train import DeviceBatches, held_on_device, make_loader

    cpu = torch.device("cpu")
    spec = (Digits(image_size=8, random_flip=True, dequantization="uniform") if name == "digits"
            else Toy2D(n=100))
    data = spec.create("train")
    held = held_on_device(data, cpu)
    per_epoch = len(data) // 32
    for world, rank, start in ((1, 0, 0), (2, 1, per_epoch - 2)):
        steps = StepBatches(len(data), 32, Context(rank, world, cpu), seed=3, start=start)
        for sampler in (steps, ReferenceBatches(steps, 7, gather=world > 1)):
            new = make_loader(data, sampler, 0, cpu, held)
            assert isinstance(new, DeviceBatches)
            pairs = islice(zip(make_loader(data, sampler, 0, cpu), new), 5)  # into the next epoch
            for step, (a, b) in enumerate(pairs, start=start):
                assert a.dtype == b.dtype and torch.equal(a, b)
                ga, gb = (generator(cpu, 3, "noise", step, rank, 0) for _ in range(2))
                assert torch.equal(spec.transform(a, ga), spec.transform(b, gb))


def test_training_on_device_batches_matches_the_dataloader(tiny_recipe, monkeypatch):
    """Three training steps over batches held on the device give the weights of three steps
    over the DataLoader (the path before the data were held on the device)."""
    import stcli.jobs.train as st_train

    steps = {"steps": 3, "ckpt_every": 3}
    a = train(load_recipe(tiny_recipe("held", train=steps))).out_dir
    monkeypatch.setattr(st_train, "held_on_device", lambda dataset, device: None)
    b = train(load_recipe(tiny_recipe("loader", train=steps))).out_dir
    assert_same_tensors(tensors(a / "ckpt.safetensors"), tensors(b / "ckpt.safetensors"))
