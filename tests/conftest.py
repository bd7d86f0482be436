import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


def train_tiny(root: Path, steps: int = 2, **sections) -> Path:
    """Train the tiny recipe (sections merged into it) into `root`/run; return its checkpoint."""
    from stcli.components.recipe import load_recipe
    from stcli.jobs.train import train

    data = {**TINY, **sections, "train": {**TINY["train"], "out_dir": str(root / "run"), "steps": steps}}
    (root / "r.yaml").write_text(yaml.safe_dump(data))
    return train(load_recipe(root / "r.yaml")).out_dir / "ckpt.safetensors"


@pytest.fixture(scope="session")
def tiny_ckpt_shared(tmp_path_factory) -> Path:
    """The one checkpoint of the tiny recipe after 2 training steps, trained once per session.
    Read-only: tests that write next to it or change it use `tiny_ckpt` (a private copy)."""
    return train_tiny(tmp_path_factory.mktemp("tiny_ckpt"))


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_ckpt_shared, tmp_path_factory) -> Path:
    """A copy of the session's tiny checkpoint (with its run folder) for one test module."""
    run = tmp_path_factory.mktemp("tiny_ckpt_copy") / "run"
    shutil.copytree(tiny_ckpt_shared.parent, run)
    return run / tiny_ckpt_shared.name


def with_eval(ckpt: Path, dst: Path, evaluation: dict) -> Path:
    """A copy of checkpoint `ckpt` at `dst` whose recipe's eval section has `evaluation` merged
    in: the same weights, as if trained with that eval section (which training never reads)."""
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(ckpt), framework="pt") as f:
        meta = dict(f.metadata())
    recipe = json.loads(meta["recipe"])
    merged = recipe.get("eval") or {}
    for section, values in evaluation.items():
        merged[section] = {**(merged.get(section) or {}), **values}
    meta["recipe"] = json.dumps({**recipe, "eval": merged})
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(ckpt)), str(dst), metadata=meta)
    return dst


class Gaussian:
    """Data N(m, Sigma), Sigma = Q diag(lam) Q^T (s^2 I unless `rotate`), diffused by `sde`:
    p_t = N(mu_t m, V_t), V_t = mu_t^2 Sigma + sigma_t^2 I with eigenvalues v_i(t) = mu_t^2 lam_i
    + sigma_t^2 (Eqs. (13)-(14) for a Gaussian).  Calling it gives the exact time-t score, for x of
    any shape (N, ...) when Sigma = s^2 I; `rotate` needs `d` and x of shape (N, d)."""

    def __init__(self, sde, d: int | None = None, m: float = 0.3, s: float = 0.5, rotate=False):
        self.sde, self.d, self.m, self.s = sde, d, m, s
        self.Q, self.lam = None, s**2
        if rotate:  # a random rotation and spread eigenvalues: Hutchinson then has variance
            g = torch.Generator().manual_seed(d)
            self.Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
            self.lam = torch.linspace(0.05, 1.0, d, dtype=torch.float64)
            self.Q, self.lam = self.Q.to(DEVICE), self.lam.to(DEVICE)

    def a2(self, t):
        """v(t) = mu_t^2 s^2 + sigma_t^2 (isotropic data)."""
        return self.sde.mean_coef(t) ** 2 * self.s**2 + self.sde.var(t)

    def _eig(self, t):  # mu_t (B, 1) and v_i(t) (B, d) or (B, 1)
        mu, var = self.sde.mean_coef(t)[:, None], self.sde.var(t)[:, None]
        return mu, mu**2 * self.lam + var

    def _white(self, x, t):  # eigen-coordinates of x - mu_t m, and v(t), both (B, d)
        mu, v = self._eig(t)
        y = x - mu * self.m
        return (y if self.Q is None else y @ self.Q), v.expand_as(y)

    def __call__(self, x, t):
        if self.Q is None:
            from stcli.components.sdes import bcast

            return -(x - bcast(self.sde.mean_coef(t), x) * self.m) / bcast(self.a2(t), x)
        y, v = self._white(x, t)
        return -(y / v) @ self.Q.T

    score = __call__

    def logp(self, x, t):
        y, v = self._white(x, t)
        return (-0.5 * y**2 / v - 0.5 * torch.log(2 * math.pi * v)).sum(1)

    def model_nll(self, x, t0):
        """-log p^theta_t0(x) of the exact-score flow started from the prior: in eigen-coordinates
        the probability flow scales y_i by k_i = sqrt(v_i(T)/v_i(t0)) (d/dt log y_i =
        -beta/2 + g^2/(2 v_i) = d/dt log sqrt(v_i)), so -log p = -log pi(phi(x)) - sum log k_i."""
        n = x.shape[0]
        y, v0 = self._white(x, torch.full((n,), t0, dtype=x.dtype))
        mu1, v1 = self._eig(torch.full((n,), self.sde.T, dtype=x.dtype))
        k = torch.sqrt(v1 / v0)
        x_T = mu1 * self.m + (k * y if self.Q is None else (k * y) @ self.Q.T)
        return -self.sde.prior_logp(x_T) - torch.log(k).sum(1)

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64).to(DEVICE)
        return self.m + (z * self.s if self.Q is None else (z * self.lam.sqrt()) @ self.Q.T)

    def flow(self, x_T, t):
        """The closed-form probability-flow map x_t = mu_t m + (a_t / a_T)(x_T - mu_T m)."""
        T, t = (torch.tensor(v, dtype=torch.float64) for v in (self.sde.T, t))
        mu_T, mu_t = self.sde.mean_coef(T).item(), self.sde.mean_coef(t).item()
        return mu_t * self.m + math.sqrt(self.a2(t) / self.a2(T)) * (x_T - mu_T * self.m)

    def prior_bias(self):
        """|E x_out - m| from starting at N(0, prior_std^2) instead of p_T: the prior lacks
        the mean mu_T m, which the flow carries to eps scaled by a_eps / a_T."""
        T, eps = (torch.tensor(v, dtype=torch.float64) for v in (self.sde.T, self.sde.eps))
        return math.sqrt(self.a2(eps) / self.a2(T)) * self.sde.mean_coef(T).item() * self.m


def run_st(*args, timeout=300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m stcli ...` in a subprocess (one thread, no GPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "stcli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=kw.get("cwd", ROOT))


# what a launcher (torchrun, srun) sets: a test run inside a Slurm allocation must not pass them on
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "ST_DIST_TIMEOUT")


def clean_env(**extra) -> dict[str, str]:
    """This process's environment without launcher variables, one thread, no GPU, and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT),
            **extra}


@contextmanager
def ranks(*argvs: list, cwds=(ROOT, ROOT), stdout=subprocess.PIPE,
          program: tuple[str, ...] = ("-m", "stcli")) -> Iterator[list[subprocess.Popen]]:
    """Rank r of a 2-process gloo group started by hand, as srun starts its tasks (no torchrun
    parent process: about 2.5 s less per group): `python PROGRAM argvs[r]` in `cwds[r]`. A rank
    still running at the end (a failed assert) is killed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, (argv, cwd) in enumerate(zip(argvs, cwds)):
        env = clean_env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port), ST_DIST_TIMEOUT="60")
        procs.append(subprocess.Popen([sys.executable, *program, *map(str, argv)], cwd=cwd,
                                      env=env, stdout=stdout, stderr=subprocess.PIPE, text=True))
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


def run_two(*args, timeout=300, program: tuple[str, ...] = ("-m", "stcli")) -> subprocess.CompletedProcess:
    """`st ARGS` (or `python PROGRAM ARGS`) as the two ranks of one gloo group (`ranks`): rank 0's
    standard output, both standard errors, and the first non-zero exit code (else 0)."""
    with ranks(args, args, program=program) as procs:
        outs = [p.communicate(timeout=timeout) for p in procs]
    code = next((p.returncode for p in procs if p.returncode), 0)
    return subprocess.CompletedProcess(args, code, outs[0][0], outs[0][1] + outs[1][1])


def st(capsys, *argv) -> tuple[int, str, str]:
    """`st ARGV` in this process: (exit code, stdout, stderr)."""
    from stcli.jobs.cli import main

    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr()
    return code, out.out, out.err
