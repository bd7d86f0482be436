"""What a recipe costs before it runs: parameters, FLOPs, memory, and time on a named GPU.

The score model is built on the meta device (shapes without storage), so even the 65M-parameter
256x256 nets are measured on any machine, with nothing allocated:

* FLOPs are counted by torch's FlopCounterMode: convolutions (the FIR filters' depthwise ones
  too) and matrix products (linear layers, attention's q k^T and its product with v), at
  2 FLOPs per multiply-accumulate, in the forward and the backward pass.  Elementwise ops,
  normalisation, softmax, the loss and the optimizer count 0.
* activations are the bytes of every storage autograd saves for the backward pass of one
  micro-batch (saved_tensors_hooks; each storage once, the weights themselves excluded).
* weights (with buffers), EMA, gradients and Adam's two moments are float32; fused Adam also
  keeps one float32 step counter per parameter tensor on the device.

Left out of the memory: temporaries of the backward pass and of the optimizer, the allocator's
fragmentation and cache, cuDNN workspaces, the CUDA context, and a training set st holds on
the device (in-memory data sets, as uint8).

Times divide the FLOPs by `UTILISATION` of a GPU's datasheet peak, in the precision the recipe
trains in (train.precision, train.tf32); FID sampling is timed at the same rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from stcli.infra.errors import UserError

UTILISATION = 0.4  # assumed fraction of the datasheet peak a training step or sampling reaches
FLOAT32 = 4  # bytes


@dataclass(frozen=True)
class Gpu:
    """Datasheet figures: memory in GB (10^9 bytes) and dense peak TFLOP/s per precision
    (None: no such units; the FP32 rate is used instead)."""

    name: str
    model: str
    memory_gb: float
    fp32: float
    tf32: float | None
    bf16: float | None
    fp16: float


# Vendor datasheet peaks without sparsity (the datasheets' "with sparsity" figures halved).
GPUS = {gpu.name.lower(): gpu for gpu in (
    Gpu("A100", "A100 SXM4 80 GB", 80, fp32=19.5, tf32=156, bf16=312, fp16=312),
    Gpu("A100-40GB", "A100 SXM4 40 GB", 40, fp32=19.5, tf32=156, bf16=312, fp16=312),
    Gpu("H100", "H100 SXM5 80 GB", 80, fp32=67, tf32=494.5, bf16=989.5, fp16=989.5),
    Gpu("V100", "V100 SXM2 32 GB", 32, fp32=15.7, tf32=None, bf16=None, fp16=125),
    Gpu("L40S", "L40S 48 GB", 48, fp32=91.6, tf32=183, bf16=362.05, fp16=362.05),
)}


def gpu(name: str) -> Gpu:
    """The GPU called `name` (any case); a UserError naming the known ones otherwise."""
    try:
        return GPUS[name.lower()]
    except KeyError:
        known = ", ".join(g.name for g in GPUS.values())
        raise UserError(f"unknown GPU {name!r} for --gpu; known: {known}") from None


# --- autocast on the meta device ------------------------------------------------------------------
LOW_PRECISION = {torch.conv2d, torch.conv_transpose2d, F.linear, torch.matmul, torch.mm, torch.bmm,
                 torch.addmm, F.scaled_dot_product_attention}
FULL_PRECISION = {F.group_norm, F.layer_norm}


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's casts for the ops st's nets use (autocast does not act on meta tensors):
    convolutions, matrix products and attention take float inputs in `dtype`, group and layer
    norm in float32; every other op runs in its inputs' promoted type, as under autocast."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        dtype = self.dtype if func in LOW_PRECISION else torch.float32 \
            if func in FULL_PRECISION else None
        if dtype is not None:
            args = [a.to(dtype) if _is_float(a) else a for a in args]
        return func(*args, **(kwargs or {}))


def _is_float(a) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point()


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


# --- measuring the net --------------------------------------------------------------------------
def meta_model(recipe) -> torch.nn.Module:
    """The recipe's score model on the meta device, in training mode (dropout on)."""
    from stcli.components.nets import build_score_model

    data = recipe.data.resolved()
    with torch.device("meta"):
        return build_score_model(recipe.net, recipe.sde, data.shape, data.zero_centered).train()


def _inputs(recipe, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = recipe.data.resolved().shape
    return torch.empty(batch, *shape, device="meta"), torch.empty(batch, device="meta")


def forward_flops(model: torch.nn.Module, recipe, batch: int) -> int:
    """FLOPs of one evaluation of `model` on `batch` inputs (no gradient)."""
    x, t = _inputs(recipe, batch)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t)
    return counter.get_total_flops()


def training_pass(model: torch.nn.Module, recipe, batch: int) -> tuple[int, int]:
    """(FLOPs, activation bytes) of the forward and backward pass of one micro-batch of `batch`:
    a squared error on every evaluation the loss makes (two with loss.reconstruction), under
    the recipe's autocast precision."""
    x, t = _inputs(recipe, batch)
    dtype = AUTOCAST.get(recipe.train.precision)
    evals = 2 if recipe.loss.reconstruction else 1
    counter = FlopCounterMode(display=False)
    with counter:
        with saving(model) as saved, MetaAutocast(dtype) if dtype else nullcontext():
            loss = sum((model(x, t).float() - x).square().sum() for _ in range(evals))
        loss.backward()
    return counter.get_total_flops(), sum(saved.values())


@contextmanager
def saving(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """The storages autograd saves for backward inside the block, as {storage id: bytes},
    `model`'s parameters and buffers left out.  The graph holds each saved storage until
    backward, so no id is reused meanwhile."""
    weights = {p.untyped_storage()._cdata for p in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield saved


# --- the cost of a recipe -----------------------------------------------------------------------
@dataclass(frozen=True)
class Memory:
    """Bytes on one training device (see the module docstring for what is left out)."""

    weights: int
    ema: int
    gradients: int
    adam: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.ema + self.gradients + self.adam + self.activations


@dataclass(frozen=True)
class Cost:
    """A recipe's size and work on one device: `batch` images per pass, `micro_batches`
    passes per training step; `nfe` is the sampler's network evaluations per image (None for
    an adaptive sampler, whose count is known only after it runs)."""

    parameters: int
    batch: int
    micro_batches: int
    eval_flops_1: int
    eval_flops: int
    step_flops: int
    memory: Memory
    steps: int
    precision: str
    tf32: bool
    sampler: str
    nfe: int | None
    fid_samples: int  # eval.fid.n: the samples of one FID


def state_memory(model: torch.nn.Module, activations: int) -> Memory:
    """float32 weights and buffers, their EMA copy, gradients and fused Adam's state."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights = sum(t.numel() for t in (*model.parameters(), *model.buffers())) * FLOAT32
    grads = sum(p.numel() for p in trainable) * FLOAT32
    adam = 2 * grads + len(trainable) * FLOAT32  # exp_avg, exp_avg_sq, a step count per tensor
    return Memory(weights, weights, grads, adam, activations)


def count(recipe) -> Cost:
    """The cost of `recipe` on one device (one process: the whole train.batch_size, in
    train.micro_batches passes, or passes of train.batch_per_device)."""
    from stcli.jobs.resources import resolve_micro_batches

    cfg = resolve_micro_batches(recipe.train, 1)
    batch = cfg.batch_size // cfg.micro_batches
    model = meta_model(recipe)
    flops, activations = training_pass(model, recipe, batch)
    return Cost(
        parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        batch=batch, micro_batches=cfg.micro_batches,
        eval_flops_1=forward_flops(model, recipe, 1), eval_flops=forward_flops(model, recipe, batch),
        step_flops=flops * cfg.micro_batches, memory=state_memory(model, activations),
        steps=cfg.steps, precision=cfg.precision, tf32=cfg.tf32,
        sampler=recipe.sample.name, nfe=sampler_nfe(recipe), fid_samples=recipe.eval.fid.n)


def sampler_nfe(recipe) -> int | None:
    """Network evaluations per image of the recipe's sampler (GridSampler.nfe); None for
    samplers without a fixed grid (the adaptive ode), whose count depends on the net."""
    from stcli.components.samplers.base import GridSampler

    if not isinstance(recipe.sample, GridSampler):
        return None
    return recipe.sample.nfe(recipe.sde)


# --- on a GPU ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    """Seconds at `UTILISATION` of `gpu`'s `rate` (TFLOP/s, named `unit`), and whether the
    training memory fits the GPU's."""

    gpu: Gpu
    unit: str
    rate: float
    step_s: float
    run_s: float
    fid_s: float | None
    fits: bool


def peak(device: Gpu, precision: str, tf32: bool) -> tuple[str, float]:
    """(name, TFLOP/s) of the datasheet peak for train.precision and train.tf32 on `device`:
    TF32 tensor cores for fp32 with tf32, else FP32; BF16/FP16 tensor cores under autocast.
    A GPU without the units (V100: no TF32, no BF16) gets its FP32 rate."""
    unit = ("tf32" if tf32 else "fp32") if precision == "fp32" else precision
    if getattr(device, unit) is None:
        unit = "fp32"
    return unit.upper(), getattr(device, unit)


def timing(cost: Cost, device: Gpu) -> Timing:
    """Time per training step, per run (train.steps) and per FID (eval.fid.n samples) on
    `device` at UTILISATION of its peak."""
    unit, rate = peak(device, cost.precision, cost.tf32)
    per_s = rate * 1e12 * UTILISATION
    step = cost.step_flops / per_s
    fid = None
    if cost.nfe is not None:
        fid = cost.fid_samples * cost.nfe * cost.eval_flops / cost.batch / per_s
    return Timing(device, unit, rate, step, step * cost.steps, fid,
                  cost.memory.total <= device.memory_gb * 1e9)


# --- the printed table --------------------------------------------------------------------------
COUNTED = ("FLOPs: torch's FlopCounterMode on the meta device; convolutions and matrix products "
           "at 2 FLOPs per multiply-accumulate; elementwise ops, normalisation, softmax and the "
           "optimizer count 0")
LEFT_OUT = ("memory leaves out backward and optimizer temporaries, allocator fragmentation, "
            "cuDNN workspaces, the CUDA context and a training set held on the device")


def lines(cost: Cost, timed: Timing | None = None) -> list[str]:
    """The cost as aligned `label  value` lines, then what is counted and left out."""
    m = cost.memory
    rows = [
        ("parameters (trainable)", f"{cost.parameters:,}"),
        ("FLOPs: forward, batch 1", gflop(cost.eval_flops_1)),
        (f"FLOPs: forward, batch {cost.batch}", gflop(cost.eval_flops)),
        (f"FLOPs: training step, {cost.micro_batches} x batch {cost.batch}", gflop(cost.step_flops)
         + " (forward + backward)"),
        ("memory: weights", gib(m.weights)), ("memory: EMA", gib(m.ema)),
        ("memory: gradients", gib(m.gradients)), ("memory: Adam moments (fused)", gib(m.adam)),
        (f"memory: activations, batch {cost.batch}", gib(m.activations) + " (saved for backward)"),
        ("memory: total", gib(m.total)),
        (f"sampler {cost.sampler}: NFE per image", "adaptive" if cost.nfe is None else f"{cost.nfe:,}"),
    ]
    if timed is not None:
        rows += timing_rows(cost, timed)
    width = max(len(label) for label, _ in rows)
    return [f"{label:<{width}}  {value}" for label, value in rows] + [COUNTED, LEFT_OUT]


def timing_rows(cost: Cost, t: Timing) -> list[tuple[str, str]]:
    fid = "-" if t.fid_s is None else duration(t.fid_s)
    gb = t.gpu.memory_gb
    return [
        (f"{t.gpu.name}: peak used", f"{t.unit} {t.rate:g} TFLOP/s ({t.gpu.model} datasheet, "
         f"dense) at {UTILISATION:.0%}"),
        (f"{t.gpu.name}: training step", duration(t.step_s)),
        (f"{t.gpu.name}: run of {cost.steps:,} steps", duration(t.run_s)),
        (f"{t.gpu.name}: FID of {cost.fid_samples:,} samples (eval.fid.n)", fid),
        (f"{t.gpu.name}: fits in {gb:g} GB", "yes" if t.fits else "no"),
    ]


def gflop(flops: int) -> str:
    return f"{flops / 1e9:,.1f} GFLOP"


def gib(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB"


def duration(seconds: float) -> str:
    """Seconds as s, min, h or days, three significant digits."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.3g} s"
