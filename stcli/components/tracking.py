"""Experiment tracking: what a run records every log window and the loggers that write it.

`train.log: [jsonl, csv, tensorboard, wandb]` names registered loggers (LOGGERS; jsonl is
always on).  Every `train.log_every` steps (and at held-out and final steps) rank 0 writes one
record of the window, the steps since the previous record:

- `loss`: the mean training loss, and `loss_t/<lo>-<hi>`: the mean per-sample loss of the
  samples whose diffusion time t fell in each of T_BINS log-spaced bins over [eps, T] — the
  Monte-Carlo loss per diffusion time of the paper's Fig. 6(a) — over every sample of every
  rank (None where a bin got no sample);
- tau's mean, min, quantiles and max over the window's draws (Soft Truncation draws one tau
  ~ P(tau) per step, Sec. 4.2; a single draw says little about P);
- the gradient norm before clipping (mean and max over the window) and the learning rate;
- steps/s and images/s over the window, the peak memory (CUDA: max_memory_allocated, CPU:
  the peak resident set; the max over ranks) and the run's wall clock `wall_s`, which the
  checkpoint stores, so it continues across resumes;
- with `train.heldout_every`, the loss of the model and of the EMA on a fixed test batch.

Loggers that take flat scalars (csv, tensorboard, wandb) see nested values flattened to
`key/sub/i`; tensorboard and wandb also get the sample grids as images.  On `--resume` each
logger drops what it holds after the checkpoint's step, so every step is logged once.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist

from stcli.components.data import collate
from stcli.components.targets import DSM
from stcli.infra import distributed
from stcli.infra.console import info
from stcli.infra.errors import UserError
from stcli.infra.registry import LOGGERS, Component
from stcli.infra.runlock import atomic, is_disk_full
from stcli.infra.seeding import generator

T_BINS = 8
TAU_QUANTILES = (0.1, 0.5, 0.9)
HELDOUT_KEYS = ("heldout_loss", "heldout_loss_ema")
EVAL_KEYS = ("fid", "kid_mean", "kid_std")  # train.eval_every (stcli.jobs.train_fid)


# --- the statistics of a window ----------------------------------------------------------------
def t_bin_edges(eps: float, T: float, n: int = T_BINS) -> list[float]:
    """Edges of n log-spaced bins over [eps, T]: eps (T/eps)^(i/n), i = 0..n."""
    return [eps * (T / eps) ** (i / n) for i in range(n + 1)]


def bin_keys(edges: list[float]) -> list[str]:
    return [f"loss_t/{lo:.1e}-{hi:.1e}" for lo, hi in zip(edges, edges[1:])]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: CUDA allocations, else the resident set (ru_maxrss,
    KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Window:
    """Accumulates one log window: per-sample (t, loss) on the device without synchronising,
    and per step the (already synchronised) loss, tau and gradient norm."""

    def __init__(self, eps: float, T: float, batch_size: int, device: torch.device):
        self.edges = t_bin_edges(eps, T)
        self.keys = bin_keys(self.edges)
        self.batch_size, self.device = batch_size, device
        self._inner = torch.tensor(self.edges[1:-1], dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, T_BINS, dtype=torch.float64, device=self.device)
        self.losses, self.taus, self.grad_norms = [], [], []
        self.start, self.paused = time.perf_counter(), 0.0

    def exclude(self, seconds: float) -> None:
        """Time spent on other work than training steps (checkpoints, sample grids,
        evaluations): left out of steps_per_s, so the rate and the ETA are the training's."""
        self.paused += seconds

    def add_samples(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Bin i holds edges[i] <= t < edges[i + 1] (t = T in the last)."""
        idx = torch.bucketize(t.detach().double(), self._inner, right=True)
        self.sums[0].index_add_(0, idx, losses.detach().double())
        self.sums[1].index_add_(0, idx, torch.ones_like(idx, dtype=torch.float64))

    def add_step(self, loss: float, tau: float, grad_norm: float) -> None:
        self.losses.append(loss)
        self.taus.append(tau)
        self.grad_norms.append(grad_norm)

    def summary(self) -> dict[str, Any]:
        """The window's statistics, then a fresh window.  A collective operation under several
        processes: every rank calls it at the same step."""
        total, count = distributed.all_reduce_sum(self.sums.clone()).tolist()
        peak = all_reduce_max(peak_memory_mb(self.device), self.device)
        seconds = max(time.perf_counter() - self.start - self.paused, 1e-9)
        taus = torch.tensor(self.taus, dtype=torch.float64)
        quantiles = torch.quantile(taus, torch.tensor(TAU_QUANTILES, dtype=torch.float64)).tolist()
        rate = len(self.losses) / seconds
        record = {
            "loss": sum(self.losses) / len(self.losses),
            **{k: s / c if c else None for k, s, c in zip(self.keys, total, count)},
            "tau_mean": taus.mean().item(), "tau_min": taus.min().item(),
            **{f"tau_q{round(100 * p):02d}": q for p, q in zip(TAU_QUANTILES, quantiles)},
            "tau_max": taus.max().item(),
            "grad_norm": sum(self.grad_norms) / len(self.grad_norms),
            "grad_norm_max": max(self.grad_norms),
            "steps_per_s": rate, "images_per_s": rate * self.batch_size, "peak_mem_mb": peak,
            "window_steps": len(self.losses),
        }
        self.reset()
        return record


class Clock:
    """The run's wall clock: `before` seconds (of earlier sessions, from the checkpoint's
    `wall_s`) plus the time since this session started."""

    def __init__(self, before: float = 0.0):
        self.before, self.start = before, time.perf_counter()

    def now(self) -> float:
        return self.before + time.perf_counter() - self.start

    @classmethod
    def resumed(cls, meta: dict, path: Path) -> Clock:
        value = meta.get("wall_s", 0.0)  # 0: a checkpoint written before st kept the wall clock
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise UserError(f"checkpoint {path} is damaged: its wall_s is {value!r}, not a number of seconds")
        return cls(float(value))


def flatten(record, prefix: str = "") -> dict[str, float | None]:
    """The numbers of `record` (None where missing, NaN as None), nested dicts and lists
    flattened to `a/b/0` keys; other values left out."""
    out = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)):
            out.update(flatten(v, f"{key}/"))
        elif v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)):
            out[key] = v if v is None or math.isfinite(v) else None
    return out


def scalars(record: dict) -> dict[str, float]:
    """The flattened numbers of `record` that are present and finite."""
    return {k: v for k, v in flatten(record).items() if v is not None}


# --- held-out loss -----------------------------------------------------------------------------
class HeldOut:
    """The loss on a fixed batch of the test split (`train.heldout_every`): its first `size`
    items, dealt out over the ranks, with the same flips, dequantisation, t and z at every
    evaluation (a generator seeded by (seed, "heldout", rank)), tau = eps (the whole objective,
    whatever P(tau)) and the plain denoising target, so that values compare across steps."""

    def __init__(self, recipe, ctx: distributed.Context, size: int, chunk: int):
        data = recipe.data
        if "test" not in data.splits:
            raise UserError(f"train.heldout_every needs a test split, and dataset {data.name!r} has "
                            f"only {', '.join(data.splits)}; set train.heldout_every=0")
        trained = data.training_split
        if trained == "all" or "test" in trained.split("+"):
            raise UserError(f"train.heldout_every: the model trains on split {trained!r}, which "
                            "holds the test items, so their loss is not held out; train on a "
                            "split without them or set train.heldout_every=0")
        dataset = data.create("test")
        self.n = min(size, len(dataset))
        if self.n < size and ctx.is_main:
            info(f"train.heldout_size={size}: the test split holds {self.n} items; using them all")
        self.items = collate([dataset[i] for i in range(ctx.rank, self.n, ctx.world_size)])
        self.recipe, self.ctx, self.chunk = recipe, ctx, chunk
        self.loss = recipe.loss.model_copy(update={"target": DSM()})

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, ema: torch.nn.Module) -> dict[str, float]:
        """{"heldout_loss", "heldout_loss_ema"} (a collective: every rank calls it)."""
        r, device = self.recipe, self.ctx.device
        sums = []
        for net in (model, ema):
            g = generator(device, r.seed, "heldout", self.ctx.rank)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for part in self.items.split(self.chunk):
                x0 = r.data.transform(part.to(device), g)
                total += self.loss(net, r.sde, x0, r.truncation.eps, generator=g).double().sum()
            sums.append(total)
        model_sum, ema_sum = distributed.all_reduce_sum(torch.stack(sums)).tolist()
        return {"heldout_loss": model_sum / self.n, "heldout_loss_ema": ema_sum / self.n}


# --- the loggers -------------------------------------------------------------------------------
class Logger(Component):
    """A logger spec.  `create(out_dir, resume_step, config)` opens its output in the run folder
    (rank 0, under the run lock, after every check): resume_step None for a fresh run (output
    of an earlier run that never reached a checkpoint is moved aside), else the checkpoint's
    step (what was logged after it is dropped: the resumed run logs those steps again).  The
    result has `write(record)`, `image(path, step)` and `close()`."""

    package: ClassVar[str | None] = None  # the optional package the logger needs
    install_hint: ClassVar[str] = ""

    def check(self) -> None:
        """Raise a UserError if this logger cannot work here (called before anything is written)."""
        if self.package and importlib.util.find_spec(self.package) is None:
            raise UserError(f"train.log names {self.name}, but the {self.package} package is not installed: "
                            f"pip install {self.package}{self.install_hint}, "
                            f"or remove {self.name} from train.log")


def rotate(path: Path) -> Path:
    """Move `path` (log.jsonl, a folder) to the first free log.<n>.jsonl beside it."""
    n = 1
    while (old := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(old)
    return old


def move_aside(path: Path) -> None:
    if path.exists():
        old = rotate(path)
        info(f"{path} held the log of an earlier run (no checkpoint): moved to {old.name}")


def trim_log(path: Path, step: int) -> None:
    """Keep the records of steps up to `step` (a resumed run logs the later ones again)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    with atomic(path) as tmp:
        tmp.write_text("".join(kept))


def log_write_error(path: Path, err: OSError) -> UserError:
    """The one message for a log file that cannot be written (a full disk named as such)."""
    what = "no space left on the device" if is_disk_full(err) else str(err)
    return UserError(f"cannot write the log {path}: {what}")


class FileWriter:
    """A log file of text records: no images, closed if it was opened."""

    file = None

    def image(self, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class LogWriter(FileWriter):
    """Appends one JSON record per line to log.jsonl, flushed at once."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "a")

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            raise log_write_error(self.path, err) from None


@LOGGERS.register
class Jsonl(Logger):
    """log.jsonl: one JSON record per line (nested values kept as they are)."""

    name: Literal["jsonl"] = "jsonl"

    def create(self, out_dir: Path, resume_step: int | None, config: dict) -> LogWriter:
        path = out_dir / "log.jsonl"
        if resume_step is None:
            move_aside(path)
        else:
            trim_log(path, resume_step)
        return LogWriter(path)


class CsvWriter(FileWriter):
    """log.csv: a header row, then one row per record.  The columns are fixed when the first
    row is written: those of an existing file (on resume), then the record's, then the held-out
    ones; the file is rewritten with them once, and appended to after."""

    def __init__(self, path: Path, kept: list[dict], columns: list[str]):
        self.path, self.kept, self.columns, self.file = path, kept, columns, None

    def write(self, record: dict) -> None:
        row = flatten(record)
        try:
            if self.file is None:
                for key in ["step", *row, *HELDOUT_KEYS, *EVAL_KEYS]:
                    if key not in self.columns:
                        self.columns.append(key)
                with atomic(self.path) as tmp, open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
                    writer.writeheader()
                    writer.writerows(self.kept)
                self.file = open(self.path, "a", newline="")
                self.writer = csv.DictWriter(self.file, self.columns, restval="", extrasaction="ignore")
            self.writer.writerow(row)
            self.file.flush()
        except OSError as err:
            raise log_write_error(self.path, err) from None


@LOGGERS.register
class Csv(Logger):
    """log.csv: one row per log window under a fixed header (flattened keys)."""

    name: Literal["csv"] = "csv"

    def create(self, out_dir: Path, resume_step: int | None, config: dict) -> CsvWriter:
        path, kept, columns = out_dir / "log.csv", [], []
        if resume_step is None:
            move_aside(path)
        elif path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                columns = list(reader.fieldnames or [])
                kept = [row for row in reader if _row_step(row) is not None
                        and _row_step(row) <= resume_step]
        return CsvWriter(path, kept, columns)


def _row_step(row: dict) -> int | None:
    try:
        return int(row.get("step") or "")
    except ValueError:  # a row cut by a kill
        return None


class TensorBoardWriter:
    def __init__(self, writer):
        self.writer = writer

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in scalars(record).items():
            if key != "step":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def image(self, path: Path, step: int) -> None:
        from PIL import Image

        with Image.open(path) as im:
            picture = np.asarray(im.convert("RGB"))
        self.writer.add_image("samples", picture, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


@LOGGERS.register
class TensorBoard(Logger):
    """Event files in <run>/tensorboard (torch.utils.tensorboard): every scalar, and the sample
    grids under the image tag "samples".  On resume the SummaryWriter's purge_step hides the
    events after the checkpoint's step from TensorBoard."""

    name: Literal["tensorboard"] = "tensorboard"
    package: ClassVar[str | None] = "tensorboard"

    def create(self, out_dir: Path, resume_step: int | None, config: dict) -> TensorBoardWriter:
        from torch.utils.tensorboard import SummaryWriter

        folder = out_dir / "tensorboard"
        if resume_step is None:
            move_aside(folder)
            return TensorBoardWriter(SummaryWriter(str(folder)))
        after_event_files(folder)
        return TensorBoardWriter(SummaryWriter(str(folder), purge_step=resume_step + 1))


def after_event_files(folder: Path) -> None:
    """Wait (under a second) until a new event file's name sorts after those in `folder`.
    TensorBoard reads the files in name order, events.out.tfevents.<seconds>.<host>.<pid>...,
    and a purge hides only what it has already read: a file from a resume in the same second
    as the crashed run's, with a lower PID, would be read first and purge nothing."""
    fields = (p.name.split(".")[3] for p in folder.glob("events.out.tfevents.*"))
    latest = max((int(f) for f in fields if f.isdigit()), default=None)
    while latest is not None and time.time() < latest + 1:
        time.sleep(0.02)


class WandbWriter:
    def __init__(self, wandb, run):
        self.wandb, self.run = wandb, run

    def write(self, record: dict) -> None:
        values = scalars(record)
        step = int(values.pop("step"))
        self.run.log(values, step=step)

    def image(self, path: Path, step: int) -> None:
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


@LOGGERS.register
class Wandb(Logger):
    """Weights & Biases, if installed: project $WANDB_PROJECT (default "st"), the run named after
    the recipe, its id kept in <run>/wandb_id.txt so that a resumed run continues the same W&B
    run; WANDB_MODE=offline (read by wandb itself) logs to <run>/wandb without an account."""

    name: Literal["wandb"] = "wandb"
    package: ClassVar[str | None] = "wandb"
    install_hint: ClassVar[str] = " (WANDB_MODE=offline needs no account)"

    def create(self, out_dir: Path, resume_step: int | None, config: dict) -> WandbWriter:
        import wandb

        id_file = out_dir / "wandb_id.txt"
        if resume_step is not None and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = wandb.util.generate_id()
            with atomic(id_file) as tmp:
                tmp.write_text(run_id + "\n")
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT", "st"), name=config["name"],
                             id=run_id, resume="allow", dir=str(out_dir), config=config)
        except Exception as err:  # wandb's own errors (login, network) have no common base
            raise UserError(f"cannot start W&B: {str(err).splitlines()[0] if str(err) else err!r}; "
                            "WANDB_MODE=offline logs without a connection") from None
        return WandbWriter(wandb, run)


# --- the trainer's view ------------------------------------------------------------------------
def check(names: list[str]) -> None:
    """Every logger of `names` can work here (a UserError otherwise); writes nothing."""
    for name in names:
        LOGGERS.validate(name).check()


class Tracker:
    """The run's loggers, on rank 0 (the other ranks' Tracker does nothing)."""

    def __init__(self, names: list[str], out_dir: Path, config: dict, is_main: bool):
        self.specs = [LOGGERS.validate(n) for n in names] if is_main else []
        self.out_dir, self.config, self.sinks = out_dir, config, []

    def open(self, resume_step: int | None) -> None:
        """Open every logger (rank 0, once the run folder is claimed)."""
        for spec in self.specs:
            self.sinks.append(spec.create(out_dir=self.out_dir, resume_step=resume_step,
                                          config=self.config))

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def image(self, path: Path, step: int) -> None:
        for sink in self.sinks:
            sink.image(path, step)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
