"""A real 2-process gloo process group: identical parameters and the same tau on every rank."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from conftest import ROOT, run_st


def test_two_gloo_processes_stay_in_lockstep(tiny_recipe, tmp_path):
    path = tiny_recipe("ddp", train={"steps": 4, "micro_batches": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "tests" / "ddp_probe.py"), str(path), str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    taus = [json.loads((tmp_path / f"tau-{r}.json").read_text()) for r in (0, 1)]
    assert taus[0]["world"] == taus[1]["world"] == 2
    assert len(taus[0]["tau"]) == 4 and taus[0]["tau"] == taus[1]["tau"]
    assert len(set(taus[0]["tau"])) == 4  # a fresh tau every step
    p0, p1 = (load_file(str(tmp_path / f"params-{r}.safetensors")) for r in (0, 1))
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k


def test_cli_procs_relaunches_through_torchrun(tiny_recipe):
    path = tiny_recipe("procs", train={"steps": 2})
    res = run_st("train", path, "--procs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 process(es)" in res.stdout
    assert (path.parent / "procs" / "ckpt.safetensors").is_file()
