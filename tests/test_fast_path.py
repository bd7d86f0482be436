"""The training fast path: TF32 and channels_last by default on CUDA only, both resumable."""

import json

import pytest
import torch

from stcli.components.recipe import Train, load_recipe
from stcli.infra.distributed import Context
from stcli.jobs.train import Trainer, cuda_fast_path, train


@pytest.fixture
def restore_precision():
    """Put the global CUDA fp32 precision flags back after the test."""
    saved = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    yield
    torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = saved


def precision() -> tuple[str, str]:
    return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision


def test_defaults_per_device(restore_precision):
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert cuda_fast_path(Train(), torch.device("cpu")) is False
    assert precision() == ("ieee", "ieee")  # CPU runs leave the CUDA flags alone
    assert cuda_fast_path(Train(), torch.device("cuda")) is True
    assert precision() == ("tf32", "tf32")
    assert cuda_fast_path(Train(tf32=False, channels_last=False), torch.device("cuda")) is False
    assert precision() == ("ieee", "ieee")
    assert cuda_fast_path(Train(channels_last=True), torch.device("cpu")) is True


def test_channels_last_trains_the_same_function_and_resumes(tiny_recipe, tiny_ckpt_shared):
    """channels_last changes the memory layout only: the same steps log the same losses and
    gradient norms (to float rounding), and a run may be resumed with the other layout."""
    plain = tiny_ckpt_shared.parent  # the tiny recipe, 2 steps, default (NCHW) layout on CPU
    path = tiny_recipe("nhwc", train={"steps": 2, "channels_last": True})
    nhwc = train(load_recipe(path)).out_dir
    logs = [[json.loads(line) for line in (run / "log.jsonl").open()] for run in (plain, nhwc)]
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    resumed = train(load_recipe(path, ["train.steps=3", "train.channels_last=false"]), resume=True)
    assert resumed.step == 3


def test_layout_follows_the_recipe(tiny_recipe):
    for value, nhwc in ((None, False), (True, True)):  # default on CPU: plain NCHW
        recipe = load_recipe(tiny_recipe(f"l{value}", train={"channels_last": value}))
        trainer = Trainer(recipe, Context(0, 1, torch.device("cpu")))
        conv = next(p for p in trainer.model.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1)
        assert conv.is_contiguous(memory_format=torch.channels_last) == nhwc
        assert conv.is_contiguous() != nhwc
