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
import math
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from stcli.components import tracking
from stcli.components.data import InMemory, collate, data_digest
from stcli.components.loading import load_weights, open_checkpoint
from stcli.components.nets import build_score_model
from stcli.components.recipe import Recipe
from stcli.infra import checkpoint, distributed
from stcli.infra.console import StepProgress, fmt_eta, info, warn
from stcli.infra.errors import TrainingStopped, UserError, plain_message
from stcli.infra.images import save_grid
from stcli.infra.runlock import RunLock
from stcli.infra.seeding import generator, seed_for
from stcli.jobs import rundir
from stcli.jobs.resources import (
    check_training_fits,
    is_out_of_memory,
    oom_message,
    resolve_micro_batches,
    resolve_workers,
)
from stcli.jobs.resources import default_workers as default_workers  # still importable from here
from stcli.jobs.rundir import RESUMABLE as RESUMABLE  # still importable from here
from stcli.jobs.rundir import check_compatible, prune_snapshots, resolve_resume
from stcli.jobs.rundir import load_run_folder as load_run_folder  # still importable from here
from stcli.jobs.sample import grid_share, padded_score
from stcli.jobs.train_fid import TrainingFID

INITIAL_LOSS_SCALE = 2.0**16  # fp16: the loss scale of a fresh run (torch's GradScaler default)


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
    def __init__(self, recipe: Recipe, ctx: distributed.Context, resume: bool = False,
                 data_changed: bool = False):
        self.ctx = ctx
        distributed.same_everywhere(recipe.to_yaml(), ctx, "recipes (or overrides)")
        with distributed.checked(ctx, "check its inputs"):  # each rank reads its own files
            self._prepare(recipe, resume, data_changed)
        # what each rank read alone must agree: data not shared between nodes (data.channels:
        # auto resolved apart, other images), a run folder resumed on one node only
        distributed.same_everywhere(f"{self.recipe.to_yaml()}{self.data_record}", ctx,
                                    "data (as each node reads it)", "give every node the same data")
        distributed.same_everywhere(f"step {self.step} after {self.clock.before!r} s", ctx,
                                    "checkpoints to resume from", "give every node the same run folder")
        self.ddp = distributed.wrap(self.model, ctx)
        self.forward = torch.compile(self.ddp) if self.cfg.compile else self.ddp
        self._stop_signal = 0
        recipe = self.recipe  # resolved (e.g. data.channels: auto)
        self.tracker = tracking.Tracker(self.cfg.log, self.out_dir, recipe.to_dict(), ctx.is_main)
        self.window = tracking.Window(recipe.truncation.eps, self.sde.T, self.cfg.batch_size, self.device)
        self.evaluate = TrainingFID.prepare(recipe, ctx) if self.cfg.eval_every else None

    def _prepare(self, recipe: Recipe, resume: bool, data_changed: bool) -> None:
        """Everything each rank builds alone (no collective): the checks of the recipe against
        this machine, the data, the model, the optimizer, the resumed state, the held-out batch."""
        ctx = self.ctx
        self.recipe = recipe.model_copy(update={"data": recipe.data.resolved()})  # channels: auto
        recipe = self.recipe
        self.cfg, self.device = resolve_micro_batches(recipe.train, ctx.world_size), ctx.device
        self.cfg = resolve_workers(self.cfg, self.device)
        if self.cfg.batch_size % (ctx.world_size * self.cfg.micro_batches):
            raise UserError(f"train.batch_size={self.cfg.batch_size} must be divisible by "
                            f"processes x micro_batches = {ctx.world_size * self.cfg.micro_batches}")
        self.out_dir = recipe.out_dir
        self.ckpt_path = self.out_dir / rundir.CHECKPOINT
        self.data = recipe.data
        check_training_fits(recipe, self.device,
                            self.cfg.batch_size // (ctx.world_size * self.cfg.micro_batches))
        self.dataset = self.data.create(self.data.training_split)
        self.data_record, self.data_changed = data_digest(self.dataset), data_changed
        self.sde = recipe.sde
        if self.cfg.sample_every:  # the sample grids: refused now, not after hours of training
            recipe.sample.check(self.sde)
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
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=INITIAL_LOSS_SCALE,
                                           enabled=self.cfg.precision == "fp16")
        self.step, self.skipped = 0, 0  # skipped: fp16 attempts redone since the last log record
        torch.manual_seed(seed_for(recipe.seed, "global", ctx.rank))
        self.resume, self._ckpt_id = resume, None
        self.clock = tracking.Clock()
        rundir.check_out_dir(self.out_dir, resume)
        if resume:
            self._load(self.ckpt_path)
        self.heldout = tracking.HeldOut(recipe, ctx, self.cfg.heldout_size,
                                        self.cfg.batch_size // ctx.world_size // self.cfg.micro_batches) \
            if self.cfg.heldout_every else None

    # --- run directory and checkpoints ------------------------------------------------------
    def _claim_out_dir(self) -> None:
        """Prepare the run folder on rank 0 (under the run lock, once every check has passed)."""
        def prepare() -> None:
            rundir.prepare_out_dir(self.out_dir, self.resume, self._ckpt_id, self.recipe,
                                   open_log=lambda: self.tracker.open(self.step if self.resume else None))

        rundir.claim_out_dir(self.ctx, prepare)

    def _state(self) -> tuple[dict, dict]:
        tensors, groups = checkpoint.training_state(self.model, self.ema, self.optimizer, self.device)
        meta = {"step": self.step, "recipe": self.recipe.to_dict(), "optim_groups": groups,
                "world_size": self.ctx.world_size, "wall_s": self.clock.now(),
                "data": self.data_record}
        if self.scaler.is_enabled():
            meta["grad_scaler"] = self.scaler.state_dict()
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

    def _reseed(self) -> None:
        """Each rank's global RNG (dropout) for the step about to be taken: a function of
        (seed, rank, step), so a resume from any checkpoint continues every rank's stream
        exactly. (A checkpoint held rank 0's RNG state only, which restored on every rank
        repeated rank 0's dropout masks on the others: a multi-process resume was not
        bit-exact.)"""
        torch.manual_seed(seed_for(self.recipe.seed, "global", self.ctx.rank, self.step + 1))

    def _last_good(self) -> str:
        return f"the last good checkpoint {self.ckpt_path} is untouched" if self.ckpt_path.exists() \
            else "no checkpoint was written yet"

    def _check_same_data(self, trained: dict | None, path: Path) -> None:
        """The data a resumed run reads is the data it trained on (checkpoints from before
        the data record was written are not checked)."""
        now = self.data_record
        if trained is None or trained == now:
            return
        where = f" (data.root {self.data.root!r} is {self.data.root_path.resolve()})" \
            if hasattr(self.data, "root") else ""
        change = (f"{trained['items']:,} items then, {now['items']:,} now"
                  if trained["items"] != now["items"] else "the same count, other contents")
        said = (f"the {self.data.training_split} data differs from what {path} was trained on: "
                f"{change}{where}")
        if self.data_changed:
            if self.ctx.is_main:
                warn(f"{said}; resuming as --data-changed asks (the run is no longer bit-exact)")
            return
        raise UserError(f"{said}; resume where the data is the same (a relative data.root is read "
                        "from the working directory), or pass --data-changed if the change is "
                        "meant (e.g. a damaged image removed)")

    def _load(self, path: Path) -> None:
        """Restore every state of checkpoint `path`, each part checked (a UserError if not)."""
        self._ckpt_id = rundir.file_id(path)
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
        self._check_same_data(meta.get("data"), path)
        if self.cfg.steps <= opened.step:
            raise UserError(f"train.steps={self.cfg.steps} is not above the step of {path} "
                            f"({opened.step}): the run has nothing left to do; raise train.steps "
                            "to continue it")
        load_weights(self.model, checkpoint.section("model", tensors), path, "model", assign=False)
        load_weights(self.ema, checkpoint.section("ema", tensors), path, "ema", assign=False)
        if "source" in meta and "optim_groups" not in meta:
            self.step = opened.step  # an st import: the weights only, a fresh Adam and RNG
            return
        self.clock = tracking.Clock.resumed(meta, path)
        checkpoint.restore_optimizer(self.optimizer, self.model, tensors, meta, opened.step, path)
        checkpoint.restore_scaler(self.scaler, meta, opened.step, path)
        checkpoint.restore_rng(tensors, meta, self.ctx.world_size, self.device, path)
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
        times, per_sample = [], []
        autocast = torch.autocast(self.device.type, dtype=AUTOCAST.get(cfg.precision),
                                  enabled=cfg.precision in AUTOCAST)
        for i, (x0, g) in enumerate(zip(inputs, gens)):
            if self.channels_last and x0.dim() == 4:
                x0 = x0.contiguous(memory_format=torch.channels_last)
            sync = i == len(micro) - 1 or self.ctx.world_size == 1
            with (nullcontext() if sync else self.ddp.no_sync()), autocast:
                losses, t = self.recipe.loss.with_times(self.forward, self.sde, x0, tau, generator=g,
                                                        reference=reference)
                self.scaler.scale(losses.sum() / batch.shape[0]).backward()
            loss_sum += losses.detach().sum()
            times.append(t)
            per_sample.append(losses.detach())
        self.step_samples = torch.cat(times), torch.cat(per_sample)  # for the log window
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
        self.scaler.unscale_(self.optimizer)  # fp16: the gradients / loss scale (else nothing)
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
        batches, references = iter(loader), iter(extras) if extras is not None else None
        first = self._first_batch(batches, references) if self.step < cfg.steps else None
        self._claim_out_dir()
        handlers = self._install_signal_handlers()
        t0, loss_avg = time.perf_counter(), float("nan")
        self.window.reset()
        self.model.train()
        try:
            with StepProgress("train", cfg.steps, self.step, enabled=ctx.is_main) as progress:
                while self.step < cfg.steps:
                    batch, extra = first or self._next_batch(batches, references)
                    first = None
                    loss, tau, gnorm, stop = self._good_step(batch, extra)
                    self.update_ema()
                    self.step += 1
                    self.window.add_samples(*self.step_samples)  # of the attempt that counted (fp16)
                    self.window.add_step(loss, tau, gnorm)
                    heldout = self.heldout is not None and self.step % cfg.heldout_every == 0
                    evaluate = self.evaluate is not None and self.step % cfg.eval_every == 0
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps or heldout or evaluate:
                        loss_avg = self._log_window(progress, heldout, evaluate, t0)
                    if stop:
                        self._stop()
                    paused = time.perf_counter()
                    self._periodic()
                    self.window.exclude(time.perf_counter() - paused)
        finally:
            self._restore_signal_handlers(handlers)
            self.tracker.close()
        return TrainResult(self.step, loss_avg, self.out_dir)

    def _log_window(self, progress: StepProgress, heldout: bool, evaluate: bool, t0: float) -> float:
        """Write the statistics of the steps since the last record (and, when due, the held-out
        losses and the FID of the EMA model) to every logger, update the progress line, and
        return the window's mean loss."""
        record = {"step": self.step, **self.window.summary(),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "wall_s": self.clock.now(), "elapsed_s": time.perf_counter() - t0}
        paused = time.perf_counter()
        if heldout:
            record.update(self._heldout_losses())
        if evaluate:
            record.update(self.evaluate(self.ema, self.step))
        self.window.exclude(time.perf_counter() - paused)  # the next window's rate: training only
        if self.feed is not None:
            record.update(self.feed.flush())
        record.update(self._scaler_record())
        self.tracker.write(record)
        rate = record["steps_per_s"]
        stats = {"loss": f"{record['loss']:.4g}", "steps/s": f"{rate:.2f}",
                 "img/s": f"{rate * self.cfg.batch_size:.0f}",
                 "eta": fmt_eta((self.cfg.steps - self.step) / max(rate, 1e-9))}
        if record["window_steps"] < self.cfg.log_every and self.step != self.cfg.steps:
            stats["window"] = f"{record['window_steps']} steps"  # e.g. the first after a resume
        if "fid" in record:
            stats["fid"] = f"{record['fid']:.4g}"
        progress.update(self.step, stats, force=True)
        return record["loss"]

    def _good_step(self, batch: torch.Tensor, extra: torch.Tensor | None
                   ) -> tuple[float, float, float, bool]:
        """One optimizer step on `batch`: (loss, tau, gradient norm, stop requested).

        With fp16, an attempt whose scaled gradients overflowed (finite loss, non-finite
        gradient norm) changes nothing but the loss scale, which the scaler halves, and is
        redone on the same batch: no Adam update, no EMA update, not counted as a step.  Its
        draws (dropout's too: `_reseed`) are keyed by the step, so only the scale differs."""
        while True:
            self._reseed()  # an fp16 attempt redone draws the same dropout masks
            with self._out_of_memory_is_a_user_error():
                loss_sum, tau = self.train_step(batch, extra)
                grad_norm = self.optimizer_step()
            stop_flag = torch.tensor(float(self._stop_signal), device=self.device)
            summed = distributed.all_reduce_sum(torch.stack([loss_sum, stop_flag]))
            total, stop, gnorm = torch.cat([summed, grad_norm[None]]).tolist()  # one sync
            loss = total / self.cfg.batch_size
            overflow = self.scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(gnorm)
            if not overflow and not (math.isfinite(loss) and math.isfinite(gnorm)):
                self._fail_non_finite(loss, gnorm)
            scale = self.scaler.get_scale() if overflow else None
            if not overflow:
                self.scaler.step(self.optimizer)  # fp32 / bf16: optimizer.step()
            self.scaler.update()  # fp16: halve the scale after an overflow, grow it after many good steps
            self.optimizer.zero_grad(set_to_none=True)
            if not overflow:
                return loss, tau, gnorm, bool(stop)
            self.skipped += 1
            if stop:
                self._stop()
            if not 1.0 <= self.scaler.get_scale() < scale:  # below 1, or the scaler saw no overflow
                self._fail_non_finite(loss, gnorm, f"loss scale {scale:g} could not make the "
                                      "gradients finite; ")

    def _scaler_record(self) -> dict:
        """fp16: the loss scale and the attempts redone since the last record (for the log)."""
        if not self.scaler.is_enabled():
            return {}
        record = {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped}
        self.skipped = 0
        return record

    def _stop(self) -> None:
        """A stop signal reached every rank: write a checkpoint and stop."""
        self.save()
        signum = self._stop_signal or signal.SIGTERM
        raise TrainingStopped(signum, f"interrupted by {signal.Signals(signum).name}"
                              f" after step {self.step}; checkpoint saved to "
                              f"{self.ckpt_path}; continue with --resume")

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

    def _first_batch(self, batches, references):
        """The first batch, read before the run folder is made: an image that cannot be decoded
        is refused on every rank with nothing written."""
        with distributed.checked(self.ctx, "read the first batch"):
            return next(batches), next(references) if references is not None else None

    def _next_batch(self, batches, references):
        """The next batch (and the target's extra reference images); an unreadable item saves a checkpoint of
        the steps done so far, then stops with the loader's message."""
        try:
            return next(batches), next(references) if references is not None else None
        except UserError as err:
            message = plain_message(err)
            if self.step and self.ctx.is_main:
                self.save()
                message += f"; stopped after step {self.step}, checkpoint saved to {self.ckpt_path}"
            elif self.step:  # rank 0's next collective fails: its last periodic checkpoint stays
                message += f"; stopped after step {self.step}; resume from rank 0's last checkpoint"
            raise UserError(message) from None

    def _periodic(self) -> None:
        cfg, s = self.cfg, self.step
        if s % cfg.ckpt_every == 0 or s == cfg.steps:
            self.save()
        if cfg.snapshot_every and s % cfg.snapshot_every == 0:
            self.save(self.out_dir / f"ckpt-{s}.safetensors", cfg.snapshot_weights == "ema")
            if cfg.keep_last and self.ctx.is_main:
                prune_snapshots(self.out_dir, cfg.keep_last, s)
        if cfg.sample_every and (s % cfg.sample_every == 0 or s == cfg.steps):
            self.sample_grid(self.out_dir / "samples" / f"grid-{s}.png")
            self.tracker.image(self.out_dir / "samples" / f"grid-{s}.png", s)

    def _heldout_losses(self) -> dict[str, float]:
        self.model.eval()
        try:
            return self.heldout.evaluate(self.model, self.ema)
        finally:
            self.model.train()

    @torch.no_grad()
    def sample_grid(self, path: Path) -> None:
        """The EMA model's sample grid, drawn by every rank (a share of the rows each, then
        gathered) so that no rank waits in a collective while another samples.  Row i comes
        from its own generator (seed, "grid", i) and network batches are padded to MIN_ROWS
        rows, so the grid is the same whatever the number of processes."""
        rows = grid_share(self.cfg.grid_size, self.ctx)
        x = torch.zeros((0, *self.data.shape), device=self.device)
        if len(rows):
            gens = [generator(self.device, self.recipe.seed, "grid", i) for i in rows]
            x = torch.stack([self.sde.prior_sample(self.data.shape, generator=g, device=self.device)
                             for g in gens])
            x, _ = self.recipe.sample(padded_score(self.ema.score), self.sde, x, generator=gens)
        x = distributed.all_gather_rows(x.float().contiguous())
        if self.ctx.is_main:
            save_grid(self.data.picture(x), path)

    def _fail_non_finite(self, loss: float, gnorm: float, why: str = "") -> None:
        raise UserError(f"non-finite training signal at step {self.step + 1} ({why}loss {loss}, "
                        f"gradient norm {gnorm}); stopped without updating the weights; "
                        f"{self._last_good()}. "
                        "Try a lower optim.lr, a longer optim.warmup or optim.grad_clip.")

    # --- signals --------------------------------------------------------------------------------
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum

        try:  # a signal the parent set to be ignored (a shell's background job) stays ignored
            return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)
                    if signal.getsignal(s) is not signal.SIG_IGN}
        except ValueError:  # not the main thread
            return {}

    @staticmethod
    def _restore_signal_handlers(handlers) -> None:
        for s, h in handlers.items():
            signal.signal(s, h)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def train(recipe: Recipe, resume: bool | str = False, data_changed: bool = False) -> TrainResult:
    """Train (or resume) `recipe`, holding its run folder's lock (rank 0) from first check to end.
    `resume="auto"`: resume if the run folder holds a checkpoint, else start afresh."""
    tracking.check(recipe.train.log)  # e.g. wandb requested but not installed: before any folder
    rundir.check_is_folder(recipe.out_dir)  # before its lock file is tried
    ctx = distributed.setup(recipe.train.device)
    lock = RunLock(recipe.out_dir, "st train") if ctx.is_main else None
    try:
        with distributed.checked(ctx, "lock the run folder or find its checkpoint"):
            if lock:
                lock.acquire()
            resume = resolve_resume(resume, recipe, ctx)
        if ctx.is_main:
            info(f"training [bold]{recipe.name}[/] on {ctx.device} x {ctx.world_size} process(es) "
                 f"-> {recipe.out_dir}")
        return Trainer(recipe, ctx, resume, data_changed).run()
    finally:
        if lock:
            lock.release()
        distributed.teardown()
