"""The training loop (DDP-aware): Soft Truncation steps, EMA, warm-up, clipping, NaN guard,
logs, sample grids and exact resume.

Every random draw of step k comes from generators seeded by (seed, k, ...): tau from
(seed, "tau", k) — identical on every rank and micro-batch — and t, z, flips and
dequantisation from (seed, "noise", k, rank, micro); the extra reference images a target may
ask for (its `feed`) from (seed, "reference", k[, rank]).  The data order is a function of the
step, so a resumed run replays exactly what an uninterrupted one would have done; only the
global RNG (dropout) needs saving, and the checkpoint holds it.
"""

from __future__ import annotations

import copy
import json
import math
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stcli import checkpoint, distributed
from stcli.console import StepProgress, fmt_eta, info
from stcli.data import InMemory, collate
from stcli.errors import TrainingStopped, UserError, plain_message
from stcli.images import save_grid
from stcli.loading import load_weights, open_checkpoint
from stcli.nets import build_score_model
from stcli.recipe import Recipe
from stcli.runlock import RunLock, is_disk_full, remove_temporaries, temporary_name
from stcli.seeding import generator, seed_for

# Fields that may change when a run is resumed; everything else must match the checkpoint.
RESUMABLE = {"steps", "log_every", "ckpt_every", "snapshot_every", "sample_every", "grid_size",
             "workers", "device", "out_dir", "channels_last", "tf32", "keep_last",
             "snapshot_weights"}


class StepBatches:
    """Batch indices of each step for one rank: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, n: int, batch: int, ctx: distributed.Context, seed: int, start: int):
        self.per_epoch = n // batch
        if self.per_epoch == 0:
            raise UserError(f"the dataset has {n} items, fewer than train.batch_size={batch}")
        self.n, self.batch, self.ctx, self.seed, self.start = n, batch, ctx, seed, start

    def global_batches(self) -> Iterator[torch.Tensor]:
        """The batch of every step from `start` on, all ranks' rows."""
        step = self.start
        while True:
            epoch, i = divmod(step, self.per_epoch)
            perm = torch.randperm(self.n, generator=generator(torch.device("cpu"), self.seed,
                                                                "data", epoch))
            for j in range(i, self.per_epoch):
                yield perm[j * self.batch:(j + 1) * self.batch]
            step = (epoch + 1) * self.per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        per_rank = self.batch // self.ctx.world_size
        for batch in self.global_batches():
            yield batch[self.ctx.rank * per_rank:(self.ctx.rank + 1) * per_rank].tolist()


class DeviceBatches:
    """The batches of an in-memory data set held on the training device as one tensor (uint8
    images, float32 toy data): each batch is one indexing op there, no worker, no per-item
    Python, no host-to-device copy of images.  It yields what the DataLoader over the same
    data and batch sampler yields, on the device."""

    def __init__(self, data: torch.Tensor, batch_sampler):
        self.data, self.batch_sampler = data, batch_sampler

    def __iter__(self) -> Iterator[torch.Tensor]:
        for indices in self.batch_sampler:
            yield self.data[torch.as_tensor(indices, dtype=torch.long).to(self.data.device)]


def held_on_device(dataset, device: torch.device) -> torch.Tensor | None:
    """An in-memory data set's tensor on the training device (None for file-backed data)."""
    return dataset.data.to(device) if isinstance(dataset, InMemory) else None


def make_loader(dataset, batch_sampler, workers: int, device: torch.device,
                held: torch.Tensor | None = None) -> DataLoader | DeviceBatches:
    """The batches of training (and of a target's reference images): from `held` (the data set
    on the device, see `held_on_device`) when given, else by a DataLoader."""
    if held is not None:
        return DeviceBatches(held, batch_sampler)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate,
                      num_workers=workers, generator=torch.Generator(),
                      pin_memory=device.type == "cuda", persistent_workers=False)


def cuda_fast_path(cfg, device: torch.device) -> bool:
    """Set the fp32 precision of CUDA matmuls and convolutions (TF32 unless ``train.tf32`` is
    false) and return whether to train in channels_last (``train.channels_last``; default:
    on CUDA).  Adam is always fused and the EMA one ``_foreach_lerp_``."""
    if device.type == "cuda":
        precision = "tf32" if cfg.tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    return device.type == "cuda" if cfg.channels_last is None else cfg.channels_last


@dataclass
class TrainResult:
    step: int
    loss: float
    out_dir: Path


class Trainer:
    def __init__(self, recipe: Recipe, ctx: distributed.Context, resume: bool = False):
        recipe = recipe.model_copy(update={"data": recipe.data.resolved()})  # e.g. channels: auto
        self.recipe, self.ctx = recipe, ctx
        self.cfg, self.device = resolve_micro_batches(recipe.train, ctx.world_size), ctx.device
        if self.cfg.batch_size % (ctx.world_size * self.cfg.micro_batches):
            raise UserError(f"train.batch_size={self.cfg.batch_size} must be divisible by "
                            f"processes x micro_batches = {ctx.world_size * self.cfg.micro_batches}")
        self.out_dir = recipe.out_dir
        self.ckpt_path = self.out_dir / "ckpt.safetensors"
        self.data = recipe.data
        self.dataset = self.data.create(self.data.training_split)
        self.sde = recipe.sde
        self.feed = recipe.loss.target.feed(self.sde, recipe.truncation.eps,
                                            self.cfg.batch_size // ctx.world_size, ctx.world_size,
                                            len(self.dataset), self.device)
        torch.manual_seed(seed_for(recipe.seed, "init"))
        self.model = build_score_model(recipe.net, self.sde, self.data.shape,
                                       self.data.zero_centered).to(self.device)
        self.channels_last = cuda_fast_path(self.cfg, self.device)
        if self.channels_last:  # converts the 4-D (conv) weights only
            self.model.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        o = recipe.optim
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2),
                                          eps=o.eps, weight_decay=o.weight_decay, fused=True)
        self.step = 0
        torch.manual_seed(seed_for(recipe.seed, "global", ctx.rank))
        self.resume, self._ckpt_id = resume, None
        self._check_out_dir()
        if resume:
            self._load(self.ckpt_path)
        self.ddp = distributed.wrap(self.model, ctx)
        self.forward = torch.compile(self.ddp) if self.cfg.compile else self.ddp
        self._stop_signal = 0

    # --- run directory and checkpoints ------------------------------------------------------
    def _check_out_dir(self) -> None:
        """What the run folder must (not) hold; writes nothing."""
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise UserError(f"train.out_dir {self.out_dir} exists and is not a folder")
        if self.resume and not self.ckpt_path.is_file():
            raise UserError(f"nothing to resume: {self.ckpt_path} does not exist")
        if not self.resume and self.ckpt_path.exists():
            raise UserError(f"{self.out_dir} already holds a run; continue it with --resume or "
                            "choose another train.out_dir")

    def _prepare_out_dir(self) -> None:
        """Under the run lock, once every check has passed: the folder as this run needs it."""
        self._check_out_dir()  # again: another run may have finished since
        if self.resume and _file_id(self.ckpt_path) != self._ckpt_id:
            raise UserError(f"{self.ckpt_path} changed while it was being read; run again")
        try:
            removed = remove_temporaries(self.out_dir)
            if removed:
                info(f"removed {removed} temporary file(s) left in {self.out_dir} by an interrupted run")
            (self.out_dir / "samples").mkdir(parents=True, exist_ok=True)
            write_text(self.out_dir / "recipe.yaml", self.recipe.to_yaml())
            log = self.out_dir / "log.jsonl"
            if self.resume:
                trim_log(log, self.step)
            elif log.exists():
                old = rotate(log)
                info(f"{log} held the log of an earlier run (no checkpoint): moved to {old.name}")
        except OSError as err:
            raise UserError(f"cannot write to the output folder {self.out_dir}: {err}") from None

    def _claim_out_dir(self) -> None:
        """Prepare the run folder on rank 0; every rank learns whether it worked."""
        failure = None
        if self.ctx.is_main:
            try:
                self._prepare_out_dir()
            except UserError as err:
                failure = err
        distributed.agree(failure, self.ctx, "prepare the run folder")

    def _state(self) -> tuple[dict, dict]:
        opt = self.optimizer.state_dict()
        tensors = {**checkpoint.prefixed("model", self.model.state_dict()),
                   **checkpoint.prefixed("ema", self.ema.state_dict()),
                   "rng.cpu": torch.get_rng_state()}
        for i, state in opt["state"].items():
            tensors.update(checkpoint.prefixed(f"optim.{i}", state))
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {"step": self.step, "recipe": self.recipe.to_dict(),
                "optim_groups": opt["param_groups"], "world_size": self.ctx.world_size}
        return tensors, meta

    def save(self, path: Path | None = None, ema_only: bool = False) -> None:
        """Write a checkpoint, never one whose model or EMA weights are not all finite
        (`ema_only`: a snapshot of the EMA weights for sampling, not for resuming)."""
        bad = [f"{prefix}.{k}" for prefix, module in (("model", self.model), ("ema", self.ema))
               for k, v in module.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise UserError(f"the weights after step {self.step} are not finite ({len(bad)} tensors, "
                            f"e.g. {bad[0]}); nothing was written; {self._last_good()}. Try a "
                            "lower optim.lr, a longer optim.warmup or optim.grad_clip.")
        if self.ctx.is_main:
            tensors, meta = self._state()
            if ema_only:
                tensors = checkpoint.prefixed("ema", checkpoint.section("ema", tensors))
                meta = {"step": meta["step"], "recipe": meta["recipe"], "snapshot_weights": "ema"}
            checkpoint.save(path or self.ckpt_path, tensors, meta)

    def _last_good(self) -> str:
        return f"the last good checkpoint {self.ckpt_path} is untouched" if self.ckpt_path.exists() \
            else "no checkpoint was written yet"

    def _load(self, path: Path) -> None:
        """Restore every state of checkpoint `path`, each part checked (a UserError if not)."""
        self._ckpt_id = _file_id(path)
        opened = open_checkpoint(path)
        tensors, meta = opened.tensors, opened.meta
        if meta.get("snapshot_weights") == "ema":
            raise UserError(f"{path} is a snapshot of the EMA weights only (train.snapshot_weights: "
                            "ema) and cannot be resumed; sample from it, or resume from a full checkpoint")
        if "export" in meta:
            raise UserError(f"{path} is an inference-only export (st export) and cannot be resumed; "
                            "use the training checkpoint or an st import")
        saved = opened.recipe.model_copy(update={"data": opened.recipe.data.resolved()})
        check_compatible(saved, self.recipe, path)  # data.channels auto (st import) = as resolved
        if self.cfg.steps <= opened.step:
            raise UserError(f"train.steps={self.cfg.steps} is not above the step of {path} "
                            f"({opened.step}): the run has nothing left to do; raise train.steps "
                            "to continue it")
        load_weights(self.model, checkpoint.section("model", tensors), path, "model", assign=False)
        load_weights(self.ema, checkpoint.section("ema", tensors), path, "ema", assign=False)
        if "source" in meta and "optim_groups" not in meta:
            self.step = opened.step  # an st import: the weights only, a fresh Adam and RNG
            return
        try:
            self.optimizer.load_state_dict(optimizer_state(tensors, meta, self.model, opened.step, path))
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise UserError(f"checkpoint {path} is damaged: its optimizer state does not fit "
                            f"({str(err).splitlines()[0]})") from None
        if "rng.cpu" not in tensors:
            raise UserError(f"checkpoint {path} is damaged: it holds no CPU RNG state (rng.cpu)")
        if meta.get("world_size", 1) == self.ctx.world_size:
            try:
                torch.set_rng_state(tensors["rng.cpu"])
                if self.device.type == "cuda" and "rng.cuda" in tensors:
                    torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
            except (RuntimeError, TypeError) as err:
                raise UserError(f"checkpoint {path} is damaged: its RNG state cannot be restored "
                                f"({str(err).splitlines()[0]})") from None
        self.step = opened.step

    # --- one optimisation step ---------------------------------------------------------------
    def train_step(self, batch: torch.Tensor, extra: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, float]:
        """Forward/backward over micro-batches with one tau; returns (loss sum, tau).
        `extra`: the reference images the target's feed asked for (uint8, as loaded)."""
        seed, step, cfg = self.recipe.seed, self.step, self.cfg
        tau = self.recipe.truncation.sample(generator(torch.device("cpu"), seed, "tau", step))
        micro = batch.to(self.device, non_blocking=True).chunk(cfg.micro_batches)
        gens = [generator(self.device, seed, "noise", step, self.ctx.rank, i)
                for i in range(len(micro))]
        inputs = [self.data.transform(xb, g) for xb, g in zip(micro, gens)]
        reference = self._reference(inputs, extra)
        loss_sum = torch.zeros((), device=self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=cfg.precision == "bf16")
        for i, (x0, g) in enumerate(zip(inputs, gens)):
            if self.channels_last and x0.dim() == 4:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            sync = i == len(micro) - 1 or self.ctx.world_size == 1
            with (nullcontext() if sync else self.ddp.no_sync()), autocast:
                losses = self.recipe.loss(self.forward, self.sde, x0, tau, generator=g,
                                          reference=reference)
                (losses.sum() / batch.shape[0]).backward()
            loss_sum += losses.detach().sum()
        return loss_sum, tau

    def _reference(self, inputs: list[torch.Tensor], extra: torch.Tensor | None):
        """The target's reference from this rank's batch and its extra images, transformed like
        the batch (seed, "reference", step, rank); None for a target without a feed."""
        if self.feed is None:
            return None
        parts = list(inputs)
        if extra is not None and len(extra):
            g = generator(self.device, self.recipe.seed, "reference", self.step, self.ctx.rank)
            parts.append(self.data.transform(extra.to(self.device, non_blocking=True), g))
        return self.feed.reference(parts)

    def optimizer_step(self) -> torch.Tensor:
        o = self.recipe.optim
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * min(1.0, (self.step + 1) / o.warmup) if o.warmup else o.lr
        clip = o.grad_clip if o.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip, foreach=True)

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- ema + (1 - rate)(theta - ema); with ema_warmup the rate of update n = step + 1
        is min(ema, (1 + n)/(10 + n)), so early weights do not linger in short runs."""
        n, rate = self.step + 1, self.cfg.ema
        if self.cfg.ema_warmup:
            rate = min(rate, (1 + n) / (10 + n))
        ema_p = list(self.ema.parameters())
        torch._foreach_lerp_(ema_p, list(self.model.parameters()), 1.0 - rate)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # --- the loop -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, ctx = self.cfg, self.ctx
        steps = StepBatches(len(self.dataset), cfg.batch_size, ctx, self.recipe.seed, self.step)
        held = held_on_device(self.dataset, self.device)
        loader = make_loader(self.dataset, steps, cfg.workers, self.device, held)
        extras = make_loader(self.dataset, self.feed.batches(steps), cfg.workers, self.device, held) \
            if self.feed is not None and self.feed.extra else None
        self._claim_out_dir()
        log = LogWriter(self.out_dir / "log.jsonl") if ctx.is_main else None
        handlers = self._install_signal_handlers()
        t0, s0, loss_avg = time.perf_counter(), self.step, float("nan")
        window_loss, window_n = 0.0, 0
        self.model.train()
        try:
            with StepProgress("train", cfg.steps, self.step, enabled=ctx.is_main) as progress:
                batches, references = iter(loader), iter(extras) if extras is not None else None
                while self.step < cfg.steps:
                    batch, extra = self._next_batch(batches, references)
                    with self._out_of_memory_is_a_user_error():
                        loss_sum, tau = self.train_step(batch, extra)
                        grad_norm = self.optimizer_step()
                    stop_flag = torch.tensor(float(self._stop_signal), device=self.device)
                    summed = distributed.all_reduce_sum(torch.stack([loss_sum, stop_flag]))
                    total, stop, gnorm = torch.cat([summed, grad_norm[None]]).tolist()  # one sync
                    loss = total / cfg.batch_size
                    if not (math.isfinite(loss) and math.isfinite(gnorm)):
                        self._fail_non_finite(loss, gnorm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.update_ema()
                    self.step += 1
                    window_loss, window_n = window_loss + loss, window_n + 1
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        loss_avg = window_loss / window_n
                        rate = (self.step - s0) / (time.perf_counter() - t0)
                        record = {"step": self.step, "loss": loss_avg, "tau": tau,
                                  "grad_norm": gnorm, "lr": self.optimizer.param_groups[0]["lr"],
                                  "steps_per_s": rate, "images_per_s": rate * cfg.batch_size,
                                  "elapsed_s": time.perf_counter() - t0}
                        if self.feed is not None:
                            record.update(self.feed.flush())
                        if log:
                            log.write(record)
                        progress.update(self.step, {
                            "loss": f"{loss_avg:.4g}", "steps/s": f"{rate:.2f}",
                            "img/s": f"{rate * cfg.batch_size:.0f}",
                            "eta": fmt_eta((cfg.steps - self.step) / max(rate, 1e-9))}, force=True)
                        window_loss, window_n = 0.0, 0
                    if stop:
                        self.save()
                        signum = self._stop_signal or signal.SIGTERM
                        raise TrainingStopped(signum, f"interrupted by {signal.Signals(signum).name}"
                                              f" after step {self.step}; checkpoint saved to "
                                              f"{self.ckpt_path}; continue with --resume")
                    self._periodic()
        finally:
            self._restore_signal_handlers(handlers)
            if log:
                log.close()
        return TrainResult(self.step, loss_avg, self.out_dir)

    @contextmanager
    def _out_of_memory_is_a_user_error(self) -> Iterator[None]:
        """A device out-of-memory error becomes one message: the settings in force and what
        to change (the last checkpoint is untouched)."""
        try:
            yield
        except RuntimeError as err:  # torch.OutOfMemoryError is a RuntimeError
            if not is_out_of_memory(err):
                raise
            raise UserError(oom_message(self.cfg, self.ctx, self.step, self._last_good())) from None

    def _next_batch(self, batches, references):
        """The next batch (and the target's extra reference images); an unreadable item saves a checkpoint of
        the steps done so far, then stops with the loader's message."""
        try:
            return next(batches), next(references) if references is not None else None
        except UserError as err:
            message = plain_message(err)
            if self.step:
                self.save()
                message += f"; stopped after step {self.step}, checkpoint saved to {self.ckpt_path}"
            raise UserError(message) from None

    def _periodic(self) -> None:
        cfg, s = self.cfg, self.step
        if s % cfg.ckpt_every == 0 or s == cfg.steps:
            self.save()
        if cfg.snapshot_every and s % cfg.snapshot_every == 0:
            self.save(self.out_dir / f"ckpt-{s}.safetensors", cfg.snapshot_weights == "ema")
            if cfg.keep_last and self.ctx.is_main:
                prune_snapshots(self.out_dir, cfg.keep_last, s)
        if cfg.sample_every and (s % cfg.sample_every == 0 or s == cfg.steps) and self.ctx.is_main:
            self.sample_grid(self.out_dir / "samples" / f"grid-{s}.png")

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        g = generator(self.device, self.recipe.seed, "grid")
        shape = (self.cfg.grid_size, *self.data.shape)
        x = self.sde.prior_sample(shape, generator=g, device=self.device)
        x, _ = self.recipe.sample(self.ema.score, self.sde, x, generator=g)
        save_grid(self.data.picture(x), path)

    def _fail_non_finite(self, loss: float, gnorm: float) -> None:
        raise UserError(f"non-finite training signal at step {self.step + 1} (loss {loss}, "
                        f"gradient norm {gnorm}); stopped without updating the weights; "
                        f"{self._last_good()}. "
                        "Try a lower optim.lr, a longer optim.warmup or optim.grad_clip.")

    # --- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        try:
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        except ValueError:  # not the main thread
            return {}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)


def prune_snapshots(out_dir: Path, keep: int, step: int) -> None:
    """Delete all but the newest `keep` snapshots ckpt-<n>.safetensors with n <= `step` (later
    ones, left by a run that crashed before its next checkpoint, are overwritten in turn)."""
    snapshots = sorted((int(m[1]), p) for p in out_dir.glob("ckpt-*.safetensors")
                       if (m := re.fullmatch(r"ckpt-(\d+)\.safetensors", p.name)) and int(m[1]) <= step)
    for _, path in snapshots[:-keep]:
        path.unlink(missing_ok=True)


def resolve_resume(resume: bool | str, recipe: Recipe, ctx: distributed.Context) -> bool:
    """`--resume auto`: resume if the run folder holds ckpt.safetensors, else start afresh; a
    folder holding only snapshots is refused (never a silent fresh start over a trained run)."""
    if resume != "auto":
        return bool(resume)
    ckpt = recipe.out_dir / "ckpt.safetensors"
    if ckpt.exists():
        if ctx.is_main:
            info(f"--resume auto: {ckpt} exists; resuming")
        return True
    snapshots = sorted(recipe.out_dir.glob("ckpt-*.safetensors"))
    if snapshots:
        raise UserError(f"--resume auto: {recipe.out_dir} holds snapshots ({snapshots[-1].name}, ...) "
                        "but no ckpt.safetensors; copy the snapshot to continue from to "
                        "ckpt.safetensors, or choose another train.out_dir to start afresh")
    if ctx.is_main:
        info(f"--resume auto: no checkpoint in {recipe.out_dir}; starting afresh")
    return False


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


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


def oom_message(cfg, ctx: distributed.Context, step: int, last_good: str) -> str:
    per_device = cfg.batch_size // ctx.world_size
    per_pass = per_device // cfg.micro_batches
    peak = ""
    if ctx.device.type == "cuda":
        peak = f", peak {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB allocated"
    advice = [f"train.batch_per_device={max(per_pass // 2, 1)} (or train.micro_batches="
              f"{cfg.micro_batches * 2}: the same step in smaller passes)"]
    if cfg.precision == "fp32":
        advice.append("train.precision=bf16")
    advice.append("a smaller net or train.batch_size (these change the run)")
    return (f"out of memory on {ctx.device} at step {step + 1}{peak}: train.batch_size="
            f"{cfg.batch_size} over {ctx.world_size} process(es) = {per_device} per device, in "
            f"train.micro_batches={cfg.micro_batches} pass(es) of {per_pass} images, "
            f"train.precision={cfg.precision}; try {'; or '.join(advice)}. {last_good[0].upper()}"
            f"{last_good[1:]}.")


def _file_id(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def write_text(path: Path, text: str) -> None:
    """Atomically replace `path` by `text` (a temporary file, then a rename)."""
    tmp = path.with_name(temporary_name(path.name))
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
    write_text(path, "".join(kept))


def rotate(path: Path) -> Path:
    """Move `path` (log.jsonl) to the first free log.<n>.jsonl beside it."""
    n = 1
    while (old := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    path.rename(old)
    return old


def optimizer_state(tensors: dict, meta: dict, model: torch.nn.Module, step: int, path) -> dict:
    """Adam's state dict from a checkpoint, every tensor present with its parameter's shape."""
    params = list(model.parameters())
    groups = meta.get("optim_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise UserError(f"checkpoint {path} is damaged: it holds no optimizer settings (optim_groups)")
    if sorted(i for g in groups for i in g["params"]) != list(range(len(params))):
        raise UserError(f"checkpoint {path} does not match the net: its optimizer covers other "
                        "parameters")
    states = {}
    for i, p in enumerate(params):
        state = checkpoint.section(f"optim.{i}", tensors)
        if not state and step == 0:
            continue
        for key, shape in (("exp_avg", p.shape), ("exp_avg_sq", p.shape), ("step", None)):
            if key not in state:
                raise UserError(f"checkpoint {path} is damaged: it lacks the optimizer tensor "
                                f"optim.{i}.{key}")
            if shape is not None and state[key].shape != shape:
                raise UserError(f"checkpoint {path} is damaged: optim.{i}.{key} has shape "
                                f"{tuple(state[key].shape)}, its parameter {tuple(shape)}")
        states[i] = state
    return {"state": states, "param_groups": groups}


class LogWriter:
    """Appends one JSON record per line to log.jsonl, flushed at once."""

    def __init__(self, path: Path):
        self.path, self.file = path, open(path, "a")

    def write(self, record: dict) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as err:
            what = "no space left on the device" if is_disk_full(err) else str(err)
            raise UserError(f"cannot write the log {self.path}: {what}") from None

    def close(self) -> None:
        self.file.close()


def check_compatible(saved: Recipe, requested: Recipe, path: Path) -> None:
    """Refuse to resume (or evaluate) with a recipe that differs in anything but run settings."""
    a, b = saved.to_dict(), requested.to_dict()
    for d in (a, b):
        d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE}
    diffs = sorted(_diff(a, b))
    if diffs:
        raise UserError(f"the recipe differs from the one in {path} at: {', '.join(diffs)}")


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def train(recipe: Recipe, resume: bool | str = False) -> TrainResult:
    """Train (or resume) `recipe`, holding its run folder's lock (rank 0) from first check to end.
    `resume="auto"`: resume if the run folder holds a checkpoint, else start afresh."""
    ctx = distributed.setup(recipe.train.device)
    lock = RunLock(recipe.out_dir, "st train") if ctx.is_main else None
    try:
        failure = None
        if lock:
            try:
                lock.acquire()
            except UserError as err:
                failure = err
        distributed.agree(failure, ctx, "lock the run folder")
        if ctx.is_main:
            info(f"training [bold]{recipe.name}[/] on {ctx.device} x {ctx.world_size} process(es) "
                 f"-> {recipe.out_dir}")
        return Trainer(recipe, ctx, resolve_resume(resume, recipe, ctx)).run()
    finally:
        if lock:
            lock.release()
        distributed.teardown()
