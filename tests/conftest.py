import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
# The device of the tests that compare against references (closed forms, moments): cpu by
# default; benchmarks/gpu_check.sh runs them with ST_TEST_DEVICE=cuda.
DEVICE = torch.device(os.environ.get("ST_TEST_DEVICE", "cpu"))


def device_generator(seed: int) -> torch.Generator:
    """A generator on DEVICE seeded with `seed`."""
    return torch.Generator(DEVICE).manual_seed(seed)

TINY = {
    "name": "tiny",
    "seed": 3,
    "data": {"name": "digits", "image_size": 8, "padding": 0, "random_flip": True,
             "dequantization": "uniform"},
    "sde": {"name": "vp"},
    "net": {"name": "unet", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "dropout": 0.1},
    "truncation": {"name": "power", "k": 1.0, "eps": 1.0e-5},
    "loss": {"reduce": "mean"},
    "optim": {"lr": 1.0e-3, "warmup": 2},
    "train": {"steps": 6, "batch_size": 16, "log_every": 1, "ckpt_every": 3, "sample_every": 0,
              "grid_size": 4, "device": "cpu"},
    "sample": {"name": "euler_maruyama", "steps": 5},
}


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write the tiny recipe (with `train.out_dir` under tmp_path) and return its path."""

    def make(out: str = "run", **sections) -> Path:
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
        data["train"]["out_dir"] = str(tmp_path / out)
        for key, value in sections.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return make


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the tiny recipe after 2 training steps (one per test module)."""
    from stcli.recipe import load_recipe
    from stcli.train import train

    root = tmp_path_factory.mktemp("tiny_ckpt")
    data = {**TINY, "train": {**TINY["train"], "out_dir": str(root / "run"), "steps": 2}}
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    return train(load_recipe(root / "r.yaml")).out_dir / "ckpt.safetensors"


def run_st(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m stcli ...` in a subprocess (one thread, no GPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "stcli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=kw.get("cwd", ROOT))


def st(capsys, *argv) -> tuple[int, str, str]:
    """`st ARGV` in this process: (exit code, stdout, stderr)."""
    from stcli.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err
