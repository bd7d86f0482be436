"""Nothing lost: the run-folder lock, the finite-weights guard, no write before every check,
one log line per step, temporaries that never outlive a run, a full disk."""

import errno
import json
import os
import signal
import time

import pytest
import torch
import yaml
from conftest import st
from faults_util import (
    csv_and_tensorboard_steps,
    log_steps,
    mount_tmpfs,
    popen_st,
    refused,
    same_tensors,
    snapshot,
    unmount,
)
from safetensors.torch import load_file

from stcli.infra import checkpoint
from stcli.infra.runlock import LOCK, TMP_PREFIX, RunLock, remove_temporaries
from stcli.jobs.train import Trainer


def wait_for(condition, timeout=120.0, proc=None):
    end = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def last_step(log) -> int:
    try:
        lines = log.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):
        return 0


def test_two_trains_on_one_folder_the_second_is_refused_then_kill_and_resume(tiny_recipe, capsys):
    """A lock naming its holder; after SIGKILL between two checkpoints the logs are prefixes of
    one another (at most the record being written is missing from the later ones), the stale
    lock is taken over, temporaries are removed and every log (jsonl, csv, TensorBoard) holds
    every step once; the wall clock continues from the checkpoint's."""
    a = tiny_recipe("run", train={"steps": 100000, "ckpt_every": 10, "log": ["csv", "tensorboard"]})
    b = tiny_recipe("other", seed=99)
    data = yaml.safe_load(b.read_text())
    data["train"]["out_dir"] = str(a.parent / "run")
    b.write_text(yaml.safe_dump(data))
    run = a.parent / "run"
    log = run / "log.jsonl"
    first = popen_st("train", a)
    try:
        wait_for(lambda: (run / LOCK).exists() and last_step(log) >= 1, proc=first)
        before = (run / "recipe.yaml").read_bytes()
        flat = refused(st(capsys, "train", b), f"{run} is in use by another st train",
                       f"PID {first.pid} on host")
        assert "wait for it to finish or use another folder" in flat
        refused(st(capsys, "train", a, "--resume"), f"{run} is in use by another st train")
        assert (run / "recipe.yaml").read_bytes() == before
        wait_for(lambda: 4 <= last_step(log) % 10 <= 8 and last_step(log) > 10, proc=first)
        first.send_signal(signal.SIGKILL)
        first.wait(60)
    finally:
        first.kill()
    assert yaml.safe_load((run / "recipe.yaml").read_text())["seed"] == 3  # the first run's
    assert (run / LOCK).exists()  # left behind by the killed process
    saved, wall = (checkpoint.load(run / "ckpt.safetensors")[1][k] for k in ("step", "wall_s"))
    assert max(log_steps(log)) > saved  # steps after the checkpoint were logged
    # each log is flushed at every window, one after another: a kill between two of them
    # leaves the later ones one record short, never out of order; the resume below truncates
    # every log to the checkpoint's step
    steps = log_steps(log)
    for written in csv_and_tensorboard_steps(run):
        assert written == steps[:len(written)] and len(steps) - len(written) <= 1, (written, steps)
    (run / f"{TMP_PREFIX}ckpt.safetensors.x").mkdir(exist_ok=True)
    (run / f"{TMP_PREFIX}ckpt.safetensors.x" / ".tmpAbC123").write_bytes(b"\0" * 1000)
    (run / f"{TMP_PREFIX}recipe.yaml.7").write_bytes(b"")
    code, out, err = st(capsys, "train", a, "--resume", f"train.steps={saved + 3}")
    assert code == 0, err
    assert "taking over the stale lock" in out and "removed 2 temporary file(s)" in out
    assert log_steps(log) == list(range(1, saved + 4))
    assert csv_and_tensorboard_steps(run) == (log_steps(log),) * 2
    walls = [json.loads(line)["wall_s"] for line in log.read_text().splitlines()]
    assert walls[saved - 1] < wall < walls[saved]  # steps saved and saved + 1 (after the resume)
    assert all(a < b for a, b in zip(walls, walls[1:]))
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.safetensors", "log.csv", "log.jsonl",
                                                     "recipe.yaml", "samples", "tensorboard"]


def test_a_stale_lock_is_taken_over_and_a_held_one_refuses_st_sample(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "samples"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 999999, "command": "st sample"}))
    code, stdout, err = st(capsys, "sample", tiny_ckpt, "-n", 2, "--out", out, "--device", "cpu")
    assert code == 0, err
    assert "stale lock" in stdout and "PID 999999 on host elsewhere" in stdout
    assert not (out / LOCK).exists()
    before = snapshot(out)
    with RunLock(out, "st sample"):  # a live holder (an open flock of this process)
        flat = refused(st(capsys, "sample", tiny_ckpt, "-n", 4, "--out", out, "--device", "cpu"),
                       f"{out} is in use by another st sample", f"PID {os.getpid()}")
        assert "wait for it to finish" in flat
        assert snapshot(out).keys() - before.keys() == {LOCK}
    assert snapshot(out) == before


def test_non_finite_weights_are_never_written(tiny_recipe, capsys):
    """lr = 1e39: one update makes every weight non-finite; that checkpoint is not written."""
    path = tiny_recipe("huge")
    flat = refused(st(capsys, "train", path, "optim.lr=1e39", "optim.warmup=0",
                      "train.ckpt_every=1"),
                   "the weights after step 1 are not finite", "nothing was written",
                   "no checkpoint was written yet")
    assert "optim.lr" in flat
    assert not (path.parent / "huge" / "ckpt.safetensors").exists()


def test_the_guard_keeps_the_last_finite_checkpoint(tiny_recipe, capsys, monkeypatch):
    path = tiny_recipe("run", train={"steps": 3})
    assert st(capsys, "train", path)[0] == 0
    ckpt = path.parent / "run" / "ckpt.safetensors"
    before = ckpt.read_bytes()
    update = Trainer.update_ema

    def poisoned(self):  # an update that leaves a finite loss but non-finite weights
        update(self)
        if self.step == 5:
            with torch.no_grad():
                next(self.model.parameters()).fill_(float("inf"))

    monkeypatch.setattr(Trainer, "update_ema", poisoned)
    refused(st(capsys, "train", path, "--resume", "train.steps=6"),
            "the weights after step 6 are not finite", f"the last good checkpoint {ckpt} is untouched")
    assert ckpt.read_bytes() == before
    assert checkpoint.load(ckpt)[1]["step"] == 3


@pytest.mark.parametrize("field,value", [("optim.lr", ".inf"), ("optim.lr", "1e400"),
                                         ("sde.beta_max", ".nan"), ("truncation.k", ".inf"),
                                         ("truncation.eps", "-.inf"), ("loss.sigma_data", ".nan")])
def test_non_finite_recipe_numbers_are_refused(tiny_recipe, capsys, field, value):
    refused(st(capsys, "recipe", "validate", tiny_recipe(), f"{field}={value}"),
            f"{field}: Input should be a finite number")


def test_a_refused_resume_writes_nothing(tiny_recipe, capsys):
    """Issue item 3 (and `--resume` with train.steps not above the checkpoint's step)."""
    path = tiny_recipe("run", train={"steps": 3})
    assert st(capsys, "train", path)[0] == 0
    run = path.parent / "run"
    before = snapshot(run)
    refused(st(capsys, "train", path, "--resume", "net.nf=16"), "the recipe differs", "net.nf")
    refused(st(capsys, "train", path, "--resume", "train.steps=2"),
            "train.steps=2 is not above the step of", "(3)", "raise train.steps")
    refused(st(capsys, "train", path, "--resume", "train.steps=3"), "train.steps=3 is not above")
    refused(st(capsys, "train", path), "already holds a run")
    assert snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == ["ckpt.safetensors", "log.jsonl",
                                                     "recipe.yaml", "samples"]


def test_a_fresh_run_never_mixes_with_an_earlier_runs_snapshots(tiny_recipe, capsys):
    """A run killed before its first ckpt.safetensors leaves snapshots: a fresh run into the
    folder (another recipe, say) would have written ckpt-2 beside the old ckpt-4."""
    path = tiny_recipe("run", train={"steps": 4, "snapshot_every": 2})
    assert st(capsys, "train", path)[0] == 0
    run = path.parent / "run"
    (run / "ckpt.safetensors").unlink()  # as if killed before the first full checkpoint
    before = snapshot(run)
    refused(st(capsys, "train", path, "net.nf=16"), "holds snapshots of an earlier run",
            "ckpt-2.safetensors, ckpt-4.safetensors", "no ckpt.safetensors to resume")
    assert snapshot(run) == before


def test_run_folder_paths_that_are_not_what_they_should_be(tiny_recipe, tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    refused(st(capsys, "train", tiny_recipe(), f"train.out_dir={tmp_path / 'file'}"),
            "exists and is not a folder")
    assert (tmp_path / "file").read_text() == "mine"
    (tmp_path / "run" / "ckpt.safetensors").mkdir(parents=True)
    refused(st(capsys, "train", tiny_recipe(), f"train.out_dir={tmp_path / 'run'}", "--resume"),
            "ckpt.safetensors is not a file")


def test_a_fresh_run_moves_an_old_log_aside(tiny_recipe, capsys):
    path = tiny_recipe("run", train={"steps": 4})
    run = path.parent / "run"
    run.mkdir()
    old = "".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 11))
    (run / "log.jsonl").write_text(old)
    code, out, err = st(capsys, "train", path)
    assert code == 0, err
    assert "moved to log.1.jsonl" in out
    assert log_steps(run / "log.jsonl") == [1, 2, 3, 4]
    assert (run / "log.1.jsonl").read_text() == old


def test_checkpoint_temporaries_carry_one_prefix_even_when_killed(tmp_path):
    """A write killed at any moment leaves nothing but `.st-tmp-*` entries (safetensors'
    own `.tmpXXXX` file included), and remove_temporaries clears them."""
    code = ("import sys, torch; from stcli.infra import checkpoint\n"
            "checkpoint.save(sys.argv[1], {'w': torch.zeros(60_000_000)}, {'step': 1})\n")
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "ckpt.safetensors")], env=env)
    try:
        wait_for(lambda: any(p.name.startswith(TMP_PREFIX) for p in tmp_path.iterdir())
                 and any(q.stat().st_size for q in tmp_path.rglob("*") if q.is_file()), proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    left = list(tmp_path.iterdir())
    assert left and all(p.name.startswith(TMP_PREFIX) for p in left), left
    inner = [q.name for q in tmp_path.rglob("*") if q.is_file()]
    assert any(name.startswith(".tmp") for name in inner), inner  # safetensors' file, inside
    assert remove_temporaries(tmp_path) == len(left)
    assert list(tmp_path.iterdir()) == []


def _fill_on_second_save(monkeypatch):
    """Without a mountable tmpfs: the second checkpoint write meets ENOSPC part-way."""
    real, calls = checkpoint.save_file, []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 1:
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", save_file)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_recipe, tmp_path, capsys,
                                                               monkeypatch):
    reference = tiny_recipe("reference", train={"steps": 3})
    assert st(capsys, "train", reference)[0] == 0
    size = (tmp_path / "reference" / "ckpt.safetensors").stat().st_size
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, size + size // 2 + 6 * 4096)
    try:
        if not mounted:
            _fill_on_second_save(monkeypatch)
        path = tiny_recipe("run")
        data = yaml.safe_load(path.read_text())
        data["train"]["out_dir"] = str(disk / "run")
        path.write_text(yaml.safe_dump(data))
        ckpt = disk / "run" / "ckpt.safetensors"
        refused(st(capsys, "train", path), f"no space left on the device to write {ckpt}",
                "it needs about", "MiB free", "the previous file there is untouched")
        tensors, meta = checkpoint.load(ckpt)
        assert meta["step"] == 3
        assert same_tensors(tensors, load_file(str(tmp_path / "reference" / "ckpt.safetensors")))
        names = [p.name for p in (disk / "run").iterdir()]
        assert not [n for n in names if n.startswith(TMP_PREFIX) or n == LOCK], names
        assert all(p.stat().st_size for p in (disk / "run").rglob("*") if p.is_file())
    finally:
        if mounted:
            unmount(disk)


def test_disk_full_during_sampling_keeps_the_images_written(tiny_ckpt, tmp_path, capsys,
                                                             monkeypatch):
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, 4 * 4096)
    try:
        if not mounted:
            from PIL import Image

            real, calls = Image.Image.save, []

            def save(self, fp, *args, **kwargs):
                calls.append(fp)
                if len(calls) > 2:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(self, fp, *args, **kwargs)

            monkeypatch.setattr(Image.Image, "save", save)
        out = disk / "samples"
        flat = refused(st(capsys, "sample", tiny_ckpt, "-n", 40, "--out", out, "--device", "cpu",
                          "--batch-size", 40), "no space left on the device to write", "MiB free")
        assert "free some space and run the same command again" in flat
        files = [p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json"]
        assert files and all(p.suffix == ".png" and p.stat().st_size for p in files), files
        assert (out / "manifest.json").is_file()  # the run can be resumed
        assert not [p for p in out.rglob("*") if p.name.startswith(TMP_PREFIX) or p.name == LOCK]
    finally:
        if mounted:
            unmount(disk)


def test_a_full_disk_while_logging_is_one_message(tmp_path, monkeypatch):
    from stcli.components.tracking import LogWriter
    from stcli.infra.errors import UserError

    log = LogWriter(tmp_path / "log.jsonl")

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    log.file.close()
    log.file = Full()
    with pytest.raises(UserError, match="cannot write the log .*log.jsonl: no space left on the device"):
        log.write({"step": 1})


def test_ctrl_c_on_sample_says_what_is_kept_and_the_same_command_continues(tiny_ckpt, tmp_path):
    out = tmp_path / "s"
    # 2,000 images: far more than a starved test process could miss before its Ctrl-C lands
    args = ("sample", tiny_ckpt, "-n", "2000", "--out", out, "--batch-size", "8", "--sampler", "euler",
            "--steps", "40", "--device", "cpu")
    proc = popen_st(*args)
    try:
        wait_for(lambda: len(list(out.glob("000000/*.png"))) >= 8, proc=proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == ("error: interrupted (Ctrl-C): the images written so far are kept; the "
                           "same command draws only the missing ones")
    kept = len(list(out.glob("*/*.png")))
    assert 8 <= kept < 2000
