"""torch.distributed set-up (torchrun, srun / DDP) and the `--procs N` relaunch through torchrun."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from stcli.infra.errors import UserError, plain_message


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


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a Slurm node list in its compressed form, e.g. "gpu[01-03,7],login5" ->
    gpu01, gpu02, gpu03, gpu7, login5 (ranges keep their zero padding; several bracket groups
    in one name multiply out, as "r[1-2]n[1-2]")."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        if not name or not _NODE_NAME.fullmatch(name):
            raise UserError(f"cannot read the Slurm node list {nodelist!r}")
        expanded = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\[\]]*)\])?", name):
            items = _expand_ranges(ranges, nodelist) if ranges else [""]
            expanded = [h + literal + item for h in expanded for item in items]
        hosts.extend(expanded)
    return hosts


_NODE_NAME = re.compile(r"(?:[^\[\],]*\[[^\[\]]+\])*[^\[\],]*")


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    items = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise UserError(f"cannot read the Slurm node list {nodelist!r} (range {part!r})")
        items += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return items


def slurm_environment(env: dict[str, str] | os._Environ) -> dict[str, str]:
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) for a task
    that srun started, from SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the step's (else the
    job's) node list -- rank 0 runs on its first node -- and a port derived from SLURM_JOB_ID.
    Empty when not under srun with several tasks, or under torchrun (whose variables rule).
    MASTER_ADDR and MASTER_PORT, when set, are kept."""
    if "TORCHELASTIC_RUN_ID" in env or "SLURM_PROCID" not in env or "SLURM_NTASKS" not in env:
        return {}
    rank, world, local = (_env_int(env, k) for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"inconsistent Slurm environment: SLURM_PROCID={rank} with "
                        f"SLURM_NTASKS={world} (a rank must be below the number of tasks)")
    for key, value in (("WORLD_SIZE", world), ("RANK", rank)):
        if key in env and env[key] != str(value):
            raise UserError(f"inconsistent environment: {key}={env[key]} but Slurm says "
                            f"{value} (SLURM_{'NTASKS' if key == 'WORLD_SIZE' else 'PROCID'}); "
                            f"unset {key} or launch with a matching srun --ntasks")
    if world == 1:
        return {}
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    if "MASTER_ADDR" not in env:
        nodes = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                      if env.get(k)), None)
        if nodes is None:
            raise UserError("under srun with several tasks but no SLURM_JOB_NODELIST: set "
                            "MASTER_ADDR to the host of task 0")
        out["MASTER_ADDR"] = expand_nodelist(nodes)[0]
    if "MASTER_PORT" not in env:
        if "SLURM_JOB_ID" not in env:
            raise UserError("under srun with several tasks but no SLURM_JOB_ID: set MASTER_PORT")
        out["MASTER_PORT"] = str(slurm_port(_env_int(env, "SLURM_JOB_ID")))
    return out


def slurm_port(job_id: int) -> int:
    """A port in 15000..29999 (below Linux's ephemeral range) that every task of a job derives
    alike and concurrent jobs sharing a node are unlikely to share."""
    return 15000 + job_id % 15000


def _env_int(env, key: str) -> int:
    value = env.get(key, "0")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"inconsistent Slurm environment: {key}={value!r} is not an integer") from None


# Every rank draws its share of the periodic sample grid, but rank 0 alone writes checkpoints and
# snapshots while the other ranks wait in their next collective.  A checkpoint of a large net
# (about 1 GB for DDPM++) written to a slow shared file system, or a first torch.compile slower
# on one rank, can approach torch's default process-group timeout (10 minutes under NCCL),
# which would kill a healthy run; so the timeout is 2 hours by default, or ST_DIST_TIMEOUT
# seconds.
DEFAULT_TIMEOUT_S = 7200


def timeout() -> timedelta:
    """The process-group timeout: ST_DIST_TIMEOUT seconds, else DEFAULT_TIMEOUT_S."""
    value = os.environ.get("ST_DIST_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise UserError(f"ST_DIST_TIMEOUT must be a positive number of seconds, not {value!r}")
    return timedelta(seconds=seconds)


def launcher(env: dict[str, str] | os._Environ) -> tuple[int, int, int]:
    """(WORLD_SIZE, RANK, LOCAL_RANK) of torchrun's variables, each checked before a process
    group starts: integers, 1 <= WORLD_SIZE, 0 <= RANK < WORLD_SIZE, and with several processes
    a MASTER_ADDR and a MASTER_PORT in 1..65535 (else every rank waits for ever)."""
    def number(key: str, default: int, low: int = 0) -> int:
        value = env.get(key, str(default)).strip()
        if not re.fullmatch(r"[+-]?\d+", value) or int(value) < low:
            raise UserError(f"the launcher's variable {key}={env.get(key)!r} is not an integer >= {low}")
        return int(value)

    world, rank, local = number("WORLD_SIZE", 1, 1), number("RANK", 0), number("LOCAL_RANK", 0)
    if rank >= world:
        raise UserError(f"the launcher's variables say RANK={rank} of WORLD_SIZE={world}: a rank "
                        f"must be below the number of processes (0 to {world - 1})")
    if world > 1:
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k, "").strip()]
        if missing:
            raise UserError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the "
                            "processes with torchrun (or srun), or set them to rank 0's host and a free port")
        if not 1 <= number("MASTER_PORT", 0) <= 65535:
            raise UserError(f"MASTER_PORT={env['MASTER_PORT']!r} is not a port (1 to 65535)")
    return world, rank, local


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun or srun (several tasks), else run alone.
    Under srun, torchrun's variables are derived from Slurm's and exported (children and the
    rank-0 checks of the CLI see them too)."""
    os.environ.update(slurm_environment(os.environ))
    world, _, local_rank = launcher(os.environ)
    # modulo the visible GPUs: a task that sees only its own GPU (srun --gpus-per-task=1) uses cuda:0
    dev = pick_device(device, local_rank % max(1, torch.cuda.device_count()))
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        _join("nccl" if dev.type == "cuda" else "gloo", world)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return Context(rank=rank, world_size=world, device=dev)


def _join(backend: str, world: int) -> None:
    """init_process_group, said first (it waits for every rank) and a UserError if they do not
    all come within the timeout."""
    # torch._dynamo, imported after the group exists (by an Adam, a torch.compile), keeps a
    # reference to it that outlives destroy_process_group: gloo's threads then live on into the
    # interpreter's shutdown and now and then abort it (SIGABRT, "terminate called without an
    # active exception") after a clean exit code was due. Imported first, it holds none.
    import torch._dynamo  # noqa: F401

    from stcli.infra.console import info

    wait = timeout()
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if os.environ.get("RANK", "0") == "0":
        info(f"waiting for {world} processes to join at {where} (at most {wait.total_seconds():g} s; "
             "ST_DIST_TIMEOUT)")
    try:
        dist.init_process_group(backend, timeout=wait)
    except dist.DistError as err:
        raise UserError(f"the {world} processes did not all join at {where} within "
                        f"{wait.total_seconds():g} s ({type(err).__name__}); start every rank, "
                        "or raise ST_DIST_TIMEOUT") from None


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (a no-op when running alone)."""
    if dist.is_initialized():
        dist.barrier()


def failed_ranks(failed: bool, ctx: Context) -> list[int]:
    """The ranks that say they failed (a collective: every rank calls it; alone: itself or none)."""
    flags = all_gather_rows(torch.tensor([float(failed)], device=ctx.device))
    return [r for r, f in enumerate(flags.tolist()) if f]


@contextmanager
def checked(ctx: Context, what: str) -> Iterator[None]:
    """Per-rank work (a block without collectives) whose failure stops every rank: a rank
    that cannot read its inputs (a path relative to another working directory, a file missing on
    its node) no longer leaves its peers waiting in the next collective (gloo: a traceback,
    NCCL: a hang). A UserError is this rank's one message; any other error (a full disk, a bug)
    keeps its own traceback, and the peers are told all the same."""
    try:
        yield
    except Exception as err:
        with suppress(Exception):  # telling the peers must not hide this rank's own error
            failed_ranks(True, ctx)
        if isinstance(err, UserError):
            raise UserError(plain_message(err)) from None
        raise
    failed = failed_ranks(False, ctx)
    if failed:
        raise UserError(f"process(es) {', '.join(map(str, failed))} could not {what} (see its "
                        "message); every process stops")


def same_everywhere(text: str, ctx: Context, what: str,
                    fix: str = "start every rank with the same command") -> None:
    """Refuse (on every rank) processes started with different `what` (`text`: their full
    description): `--seed $RANDOM` under srun gave each rank its own seed, merged into one
    result labelled with rank 0's."""
    if ctx.world_size == 1:
        return
    digest = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")
    every = all_gather_rows(torch.tensor([digest], dtype=torch.int64, device=ctx.device))
    if bool((every != every[0]).any()):
        differ = [i for i, d in enumerate(every.tolist()) if d != every[0].item()]
        raise UserError(f"the processes were started with different {what}: rank(s) "
                        f"{', '.join(map(str, differ))} differ from rank 0; {fix}")


def peer_lost(err: BaseException) -> bool:
    """Whether `err` is a collective that failed because another rank stopped (gloo: its
    socket closed); NCCL waits for it until the process-group timeout instead."""
    return isinstance(err, RuntimeError) and any(
        s in str(err) for s in ("closed by peer", "reset by peer", "Broken pipe"))


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
    """Started by torchrun, or one of several srun tasks (then --procs would start N runs)."""
    return ("TORCHELASTIC_RUN_ID" in os.environ or launcher(os.environ)[0] > 1
            or bool(slurm_environment(os.environ)))


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
