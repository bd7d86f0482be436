"""benchmarks/gpu_check.sh runs every step on CPU (`--cpu --quick`), so it is known to work
before a GPU is lent: one table and gpu_check.json."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ["tests", "train_step", "nll", "sample", "stf", "fid"]  # items (a)-(f)


def run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path / "gc"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cpu_quick_runs_every_step_and_writes_the_table_and_json(tmp_path):
    res = run(tmp_path, "--cpu", "--quick")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "| OK |" in line]
    assert [r.split("|")[1].strip() for r in rows] == STEPS, res.stdout
    report = json.loads((tmp_path / "gc" / "gpu_check.json").read_text())
    assert [s["step"] for s in report["steps"]] == STEPS and report["quick"] is True
    logs = {s["step"]: s["log"] for s in report["steps"]}
    assert "passed" in logs["tests"] and "scipy RK45" in logs["nll"] and "(default)" in logs["nll"]
    assert "heun" in logs["sample"] and "euler_maruyama" in logs["sample"]
    assert "ddpmpp" in logs["train_step"] and "ncsnpp" in logs["train_step"]
    assert "peak extra memory" in logs["stf"] and "images/s end to end" in rows[-1]


def test_unknown_option_is_refused(tmp_path):
    res = run(tmp_path, "--gpu")
    assert res.returncode == 2 and "usage: bash benchmarks/gpu_check.sh" in res.stderr
    assert not (tmp_path / "gc").exists()
