"""Experiment tracking: window statistics against independent computations, the csv,
TensorBoard and W&B loggers, refusals before any run folder, the wall clock, held-out loss.
(Each step logged once in every logger after a crash and resume: test_faults; after Ctrl-C
and resume: test_train.)"""

import csv
import importlib.machinery
import json
import math
import socket
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import st
from faults_util import refused
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from stcli.components.loading import load_weights, open_checkpoint
from stcli.components.nets import build_score_model
from stcli.components.recipe import load_recipe
from stcli.components.tracking import Clock, HeldOut, TensorBoard, Window, flatten, t_bin_edges
from stcli.infra import checkpoint
from stcli.infra.distributed import Context
from stcli.infra.errors import UserError
from stcli.infra.seeding import generator
from stcli.jobs.train import train


def records(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def csv_rows(run):
    with open(run / "log.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def tensorboard(run):
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_window_statistics_match_an_independent_computation():
    eps, T, g = 1e-5, 1.0, torch.Generator().manual_seed(0)
    window = Window(eps, T, batch_size=32, device=torch.device("cpu"))
    ts, ls = [], []
    for _ in range(5):  # log-uniform t over [eps, T], plus the edges themselves and T
        t = eps * (T / eps) ** torch.rand(32, generator=g, dtype=torch.float64)
        t[:3] = torch.tensor([eps, T, t_bin_edges(eps, T)[3]], dtype=torch.float64)
        losses = torch.rand(32, generator=g, dtype=torch.float64) * 10
        window.add_samples(t.float(), losses.float())
        ts.append(t.float().double().numpy())
        ls.append(losses.float().double().numpy())
    taus = [0.3, 1e-5, 0.02, 0.5, 0.011]
    for i, tau in enumerate(taus):
        window.add_step(loss=float(i), tau=tau, grad_norm=2.0 + i)
    record = window.summary()
    t, loss = np.concatenate(ts), np.concatenate(ls)
    edges = np.geomspace(eps, T, 9)
    which = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, 7)  # [edge_i, edge_i+1), T in the last
    bins = [record[f"loss_t/{edges[i]:.1e}-{edges[i + 1]:.1e}"] for i in range(8)]
    for i in range(8):
        expected = loss[which == i].mean() if (which == i).any() else None
        assert bins[i] == pytest.approx(expected, rel=1e-12) if expected is not None else bins[i] is None
    assert sum((which == i).sum() for i in range(8)) == 160
    for q in (0.1, 0.5, 0.9):
        assert record[f"tau_q{round(100 * q):02d}"] == pytest.approx(np.quantile(taus, q), rel=1e-12)
    assert (record["tau_mean"], record["tau_min"], record["tau_max"]) == pytest.approx(
        (np.mean(taus), 1e-5, 0.5))
    assert (record["loss"], record["grad_norm"], record["grad_norm_max"]) == (2.0, 4.0, 6.0)
    assert record["images_per_s"] == pytest.approx(32 * record["steps_per_s"])
    assert window.sums.sum() == 0 and window.taus == []  # the next window starts afresh


def test_a_run_logs_every_window_to_jsonl_csv_and_tensorboard(tiny_recipe):
    path = tiny_recipe("tb", train={"steps": 6, "log_every": 2, "sample_every": 3,
                                    "log": ["csv", "tensorboard"]})
    result = train(load_recipe(path))
    run = result.out_dir
    log = records(run)
    assert [r["step"] for r in log] == [2, 4, 6]
    recipe = load_recipe(path)
    for r, window in zip(log, ([1, 2], [3, 4], [5, 6])):  # tau over the window's draws, redrawn here
        taus = [recipe.truncation.sample(generator(torch.device("cpu"), recipe.seed, "tau", k - 1))
                for k in window]
        assert r["tau_mean"] == pytest.approx(np.mean(taus)) and r["tau_min"] == min(taus)
        assert r["tau_q50"] == pytest.approx(np.quantile(taus, 0.5))
        binned = [v for k, v in r.items() if k.startswith("loss_t/")]
        assert len(binned) == 8 and any(v is not None for v in binned)
        assert r["peak_mem_mb"] > 0 and r["wall_s"] > 0 and r["lr"] > 0
    header, rows = csv_rows(run)
    assert header[0] == "step" and {"loss", "tau_q90", "grad_norm", "heldout_loss"} <= set(header)
    assert sum(k.startswith("loss_t/") for k in header) == 8  # every bin, empty or not
    assert [int(row["step"]) for row in rows] == [2, 4, 6]
    for row, r in zip(rows, log):
        for key, value in flatten(r).items():
            assert (row[key] == "") if value is None else float(row[key]) == pytest.approx(value)
    acc = tensorboard(run)
    tags = acc.Tags()
    assert {"loss", "tau_mean", "grad_norm", "lr", "steps_per_s", "images_per_s", "peak_mem_mb",
            "wall_s"} <= set(tags["scalars"])
    for key in ("loss", "grad_norm", "wall_s"):
        events = acc.Scalars(key)
        assert [e.step for e in events] == [2, 4, 6]
        assert [e.value for e in events] == pytest.approx([r[key] for r in log], rel=1e-6)
    assert tags["images"] == ["samples"]
    images = acc.Images("samples")
    assert [e.step for e in images] == [3, 6]
    from PIL import Image

    with Image.open(run / "samples" / "grid-6.png") as im:
        assert (images[-1].width, images[-1].height) == im.size


def test_unknown_logger_and_missing_wandb_are_refused_before_any_run_folder(tiny_recipe, capsys,
                                                                               monkeypatch):
    path = tiny_recipe("refused")
    run = path.parent / "refused"
    refused(st(capsys, "train", path, "train.log=[jsonl, tensorbord]"),
            "train.log: unknown logger 'tensorbord'", "available: csv, jsonl, tensorboard, wandb")
    assert not run.exists()
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, also where it is
    refused(st(capsys, "train", path, "train.log=[wandb]"),
            "train.log names wandb, but the wandb package is not installed", "pip install wandb")
    assert not run.exists()


def test_wandb_logs_each_window_and_a_resume_continues_its_run(tiny_recipe, monkeypatch):
    calls = []

    class Run:
        def __init__(self, **kw):
            calls.append(("init", kw))

        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: Run(**kw)
    fake.Image = lambda path: ("image", path)
    fake.util = types.SimpleNamespace(generate_id=lambda: f"id{len(calls)}")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    path = tiny_recipe("wb", train={"log": ["wandb"], "sample_every": 2, "log_every": 2})
    train(load_recipe(path, ["train.steps=2"]))
    train(load_recipe(path, ["train.steps=4"]), resume=True)
    inits = [c[1] for c in calls if c[0] == "init"]
    assert [i["id"] for i in inits] == ["id0", "id0"] and inits[0]["resume"] == "allow"
    assert inits[0]["config"]["train"]["log"] == ["jsonl", "wandb"] and inits[0]["name"] == "tiny"
    logged = [(c[1], c[2]) for c in calls if c[0] == "log"]
    assert [step for step, _ in logged] == [2, 2, 4, 4]
    assert logged[0][1]["loss"] == records(path.parent / "wb")[0]["loss"]
    assert logged[1][1] == {"samples": ("image", str(path.parent / "wb" / "samples" / "grid-2.png"))}
    assert sum(c[0] == "finish" for c in calls) == 2


def test_a_checkpoint_with_a_damaged_wall_clock_is_refused(tmp_path):
    assert Clock.resumed({}, tmp_path).now() < 60  # an older checkpoint: from 0
    assert Clock.resumed({"wall_s": 100.0}, tmp_path).now() >= 100
    with pytest.raises(UserError, match="damaged: its wall_s is 'x'"):
        Clock.resumed({"wall_s": "x"}, tmp_path)


def test_heldout_loss_is_logged_and_recomputed_from_the_checkpoint(tiny_recipe):
    path = tiny_recipe("held", train={"steps": 4, "log_every": 3, "heldout_every": 2,
                                      "heldout_size": 24})
    run = train(load_recipe(path)).out_dir
    log = records(run)
    assert [r["step"] for r in log] == [2, 3, 4]  # held-out steps get a record of their own window
    assert "heldout_loss" not in log[1]
    recipe = load_recipe(path)
    opened = open_checkpoint(run / "ckpt.safetensors")
    nets = []
    for prefix in ("model", "ema"):
        net = build_score_model(recipe.net, recipe.sde, recipe.data.shape, recipe.data.zero_centered)
        load_weights(net, checkpoint.section(prefix, opened.tensors), run, prefix)
        nets.append(net.eval())
    got = HeldOut(recipe, Context(0, 1, torch.device("cpu")), 24, 16).evaluate(*nets)
    assert got["heldout_loss"] == pytest.approx(log[-1]["heldout_loss"], rel=1e-6)
    assert got["heldout_loss_ema"] == pytest.approx(log[-1]["heldout_loss_ema"], rel=1e-6)
    assert math.isfinite(got["heldout_loss"]) and got["heldout_loss"] != got["heldout_loss_ema"]


def test_heldout_is_refused_on_trained_items_and_says_when_it_is_smaller(tiny_recipe, capsys):
    """With data.train_split=all the test items are trained on: their loss is not held out.
    A heldout_size above the test split is said, not silently cut."""
    recipe = load_recipe(tiny_recipe("all", data={"train_split": "all"}))
    with pytest.raises(UserError, match="trains on split 'all', which holds the test items"):
        HeldOut(recipe, Context(0, 1, torch.device("cpu")), 24, 16)
    recipe = load_recipe(tiny_recipe("big"))
    held = HeldOut(recipe, Context(0, 1, torch.device("cpu")), 100000, 16)
    assert held.n == len(recipe.data.create("test")) < 100000
    assert f"train.heldout_size=100000: the test split holds {held.n} items" in capsys.readouterr().out


def test_a_resumed_event_file_is_read_after_the_crashed_runs(tmp_path):
    """TensorBoard reads event files in name order and purges only what it has read: a resume in
    the same second as the crash, from a process with a lower PID, must still sort last."""
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    old = folder / f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.99999999.0"
    old.write_bytes(b"")  # a crashed run's file from this second (empty: only its name counts)
    writer = TensorBoard().create(tmp_path, resume_step=1, config={})
    for step in (2, 3):
        writer.write({"step": step, "loss": float(step)})
    writer.close()
    files = sorted(p.name for p in folder.iterdir())
    assert files[-1] != old.name and files[0] == old.name
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [2, 3]
