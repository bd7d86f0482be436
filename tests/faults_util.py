"""Helpers of the fault tests: the CLI in this process, refusals, snapshots, damaged files."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from conftest import ROOT
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stcli.infra import checkpoint


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """Assert exit code 2, no traceback and every needle in the one error message."""
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err, err
    assert err.startswith("error: "), err
    flat = " ".join(err.split())
    for needle in needles:
        assert needle in flat, (needle, err)
    return flat


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def raw(path: Path) -> tuple[dict, dict]:
    """(tensors, raw string metadata) of a safetensors file."""
    with safe_open(str(path), framework="pt") as f:
        return load_file(str(path)), dict(f.metadata())


def damaged(src: Path, dst: Path, *, drop=(), meta=None, drop_meta=(), tensors=None) -> Path:
    """A copy of checkpoint `src` with tensors dropped/replaced and metadata changed."""
    t, m = raw(src)
    t = {k: v for k, v in t.items() if k not in drop}
    t.update(tensors or {})
    m = {k: v for k, v in m.items() if k not in drop_meta}
    m.update(meta or {})
    if checkpoint.CHECKSUM in m and checkpoint.CHECKSUM not in {*drop_meta, *(meta or {})}:
        m[checkpoint.CHECKSUM] = json.dumps(checkpoint.tensors_sha256(t))  # consistent, wrong values
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(t, str(dst), metadata=m)
    return dst


def log_steps(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def csv_and_tensorboard_steps(run: Path, tag: str = "loss") -> tuple[list[int], list[int]]:
    """The steps of log.csv's rows and of TensorBoard's scalar `tag` (read as TensorBoard
    does, purges applied) in run folder `run`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with open(run / "log.csv", newline="") as f:
        rows = [int(row["step"]) for row in csv.DictReader(f)]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return rows, [e.step for e in events.Scalars(tag)]


def popen_st(*args) -> subprocess.Popen:
    """`python -m stcli ARGS` started in the background (one thread, no GPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # Ctrl-C as from a terminal: a suite started in the background (`pytest &`) passes SIGINT
    # ignored to its children, and Python then raises no KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "stcli", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def mount_tmpfs(folder: Path, size: int, readonly: bool = False) -> bool:
    """Mount a tmpfs of `size` bytes on `folder` if this machine allows it (root, Linux)."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def unmount(folder: Path) -> None:
    subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=20)
