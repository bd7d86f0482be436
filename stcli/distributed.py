"""torch.distributed set-up (torchrun / DDP) and the `--procs N` relaunch through torchrun."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from stcli.errors import UserError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of `preference` (auto | cpu | cuda | cuda:N), checked against this machine."""
    if preference == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    kind, _, index = preference.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise UserError(f"device {preference!r} is not one of auto, cpu, cuda, cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not count:
        raise UserError(f"device {preference!r}: this machine has no CUDA GPU; use cpu or auto")
    n = int(index) if index else local_rank
    if n >= count:
        raise UserError(f"device {preference!r}: this machine has {count} CUDA GPU(s), "
                        f"cuda:0 to cuda:{count - 1}")
    return torch.device(f"cuda:{n}")


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1), else run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank=rank, world_size=world, device=dev)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op when running alone)."""
    if dist.is_initialized():
        dist.barrier()


def agree(failure: Exception | None, ctx: Context, what: str) -> None:
    """Raise `failure` on its rank, and a UserError on every other rank, if any rank failed
    (so that no rank waits forever for one that stopped)."""
    failed = all_reduce_sum(torch.tensor([float(failure is not None)], device=ctx.device))
    if failure is not None:
        raise failure
    if failed.item():
        raise UserError(f"another process could not {what}")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if ctx.world_size == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def relaunch(procs: int, argv: list[str]) -> int:
    """Run `python -m stcli <argv>` in `procs` processes through torch.distributed.run."""
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={procs}", "--module", "stcli", *argv])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // procs)))
    try:
        run(args)
    except Exception as err:  # ChildFailedError: the children already reported their errors
        code = getattr(err, "failures", None)
        if code:
            return max(f.exitcode for f in code.values()) or 1
        return 1
    return 0


def is_launched() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1



def all_gather_equal(t: torch.Tensor) -> torch.Tensor:
    """Rows of `t` from every rank, rank 0's first, when every rank holds as many rows."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of `t` from every rank, rank 0's first (lengths may differ; alone: `t` itself)."""
    if not dist.is_initialized():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])
