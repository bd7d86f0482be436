"""The train section resolved against the machine: data-loader workers, micro-batches from
the batch per device, and out-of-memory errors turned into advice."""

from __future__ import annotations

import math
import os

import torch

from stcli.infra import distributed
from stcli.infra.errors import UserError


def default_workers(device: torch.device, cpus: int, local_procs: int) -> int:
    """train.workers when unset.  On CUDA: min(8, the CPUs of each process on this node), so that
    decoding and augmenting the next batches overlaps the GPU's work.  On the CPU: 0 -- the net's
    forward and backward already use every core (torch's intra-op threads), and worker processes
    would compete with them for the same cores at a start-up cost per run."""
    if device.type != "cuda":
        return 0
    return max(1, min(8, cpus // max(1, local_procs)))


def resolve_workers(cfg, device: torch.device):
    """The train section with `workers` set (default_workers when the recipe leaves it unset)."""
    if cfg.workers is not None:
        return cfg
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: the processes on this node
    return cfg.model_copy(update={"workers": default_workers(device, cpus, local)})


def resolve_micro_batches(cfg, world: int):
    """The train section with micro_batches following from batch_per_device (EDM's
    --batch-gpu): batch_size / processes / batch_per_device micro-batches per step."""
    per_device = cfg.batch_per_device
    if per_device is None:
        return cfg
    if cfg.batch_size % world or (cfg.batch_size // world) % per_device:
        raise UserError(f"train.batch_per_device={per_device} must divide the batch of each "
                        f"process, train.batch_size={cfg.batch_size} / {world} process(es)")
    micro = cfg.batch_size // world // per_device
    if "micro_batches" in cfg.model_fields_set and cfg.micro_batches not in (1, micro):
        raise UserError(f"train.micro_batches={cfg.micro_batches} contradicts "
                        f"train.batch_per_device={per_device} (which means {micro} micro-batches "
                        f"with {world} process(es)): set only one of them")
    return cfg.model_copy(update={"micro_batches": micro})


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def oom_message(cfg, ctx: distributed.Context, step: int, last_good: str) -> str:
    per_device = cfg.batch_size // ctx.world_size
    per_pass = per_device // cfg.micro_batches
    peak = ""
    if ctx.device.type == "cuda":
        peak = f", peak {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB allocated"
    advice = [f"train.batch_per_device={max(per_pass // 2, 1)} (or train.micro_batches="
              f"{cfg.micro_batches * 2}: the same step in smaller passes)"]
    if cfg.precision == "fp32":
        advice.append("train.precision=bf16 (fp16 before Ampere GPUs)")
    advice.append("a smaller net or train.batch_size (these change the run)")
    return (f"out of memory on {ctx.device} at step {step + 1}{peak}: train.batch_size="
            f"{cfg.batch_size} over {ctx.world_size} process(es) = {per_device} per device, in "
            f"train.micro_batches={cfg.micro_batches} pass(es) of {per_pass} images, "
            f"train.precision={cfg.precision}; try {'; or '.join(advice)}. {last_good[0].upper()}"
            f"{last_good[1:]}.")


# --- what a job needs, against what the machine has ------------------------------------------------
TRAIN_BYTES_PER_PARAM = 20  # float32 weights, EMA, gradients and Adam's two moments


def parameter_count(recipe) -> int:
    """Parameters of the recipe's net, counted on the meta device (nothing is allocated)."""
    from stcli.components.nets import build_score_model

    with torch.device("meta"):
        model = build_score_model(recipe.net, recipe.sde, recipe.data.resolved().shape,
                                  recipe.data.zero_centered)
    return sum(p.numel() for p in model.parameters())


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (None where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_training_fits(recipe, device: torch.device, per_device_batch: int = 1) -> None:
    """Refuse a net whose weights, EMA, gradients and Adam state, with one micro-batch of
    float32 inputs and noise (`per_device_batch` images of the data's shape), exceed `device`'s
    free memory (activations come on top), before anything is allocated."""
    n = parameter_count(recipe)
    image = math.prod(recipe.data.shape) * 4
    need, free = n * TRAIN_BYTES_PER_PARAM + 2 * per_device_batch * image, free_memory(device)
    if free is not None and need > free:
        shape = "x".join(map(str, recipe.data.shape))
        raise UserError(f"the net ({recipe.net.name}, nf={getattr(recipe.net, 'nf', '?')}) has "
                        f"{n:,} parameters and the data's images are {shape}: "
                        f"training needs at least {need / 2**30:,.1f} GiB for its weights, EMA, "
                        f"gradients, Adam state and one micro-batch of {per_device_batch} inputs, before "
                        f"activations; {device} has {free / 2**30:,.1f} GiB free")


def check_disk(n: int, bytes_each: int, folder, what: str) -> None:
    """Refuse to write `n` files of about `bytes_each` when the disk of `folder` (or its nearest
    existing parent) has less room."""
    import shutil
    from pathlib import Path

    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    need = n * bytes_each
    if need > free:
        raise UserError(f"{what} need about {_size(need)} (at most {_size(bytes_each)} each, "
                        f"uncompressed); {existing} has {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"
