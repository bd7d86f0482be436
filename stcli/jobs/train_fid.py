"""FID (and KID) of the EMA model during training: every `train.eval_every` steps, with the
recipe's `eval.fid` settings.

Everything that can fail is done once, before the first step (`TrainingFID.prepare`): the
feature extractor is built (the Inception weights found, or the run refused), the reference
statistics are computed or read from `st fid`'s cache, the sampler is resolved.  At an
evaluation every rank draws its share of `eval.fid.train_n` images (image i from its own
generator (seed, "eval", i), network batches padded as the sample grid's, so the images do not
depend on the number of processes); rank 0 gathers them, extracts their features and computes
the metrics, which go into that step's log record (jsonl, csv, TensorBoard, W&B).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stcli.infra import distributed
from stcli.infra.errors import UserError

KEYS = ("fid", "kid_mean", "kid_std")  # the log columns an evaluation fills


@dataclass
class TrainingFID:
    recipe: object
    ctx: distributed.Context
    spec: object = None  # the sampler
    extractor: object = None  # rank 0
    reference: object = None  # rank 0
    settings: object = None
    metrics: tuple = ()

    @classmethod
    def prepare(cls, recipe, ctx: distributed.Context) -> TrainingFID:
        """Every check of an evaluation, before training: a UserError (on every rank) if it
        cannot run -- no reference, no Inception weights offline, a sampler that does not fit."""
        from stcli.jobs.sample import resolve_sampler

        fid = recipe.eval.fid
        self = cls(recipe, ctx)
        with distributed.checked(ctx, "prepare the FID evaluation"):
            if not recipe.data.is_image:
                raise UserError(f"train.eval_every: dataset {recipe.data.name!r} holds no images to "
                                "measure FID on; set train.eval_every=0")
            if not fid.ref:
                raise UserError("train.eval_every needs eval.fid.ref, the reference images (e.g. "
                                "cifar10-train, a folder, or a statistics file of st fid-ref)")
            self.spec = resolve_sampler(recipe.sample, dict(fid.train_sampler))
            self.spec.check(recipe.sde)
            if ctx.is_main:
                self._prepare_features()
        return self

    def _prepare_features(self) -> None:
        from stcli.components.metrics import DEFAULT_CACHE, METRICS, Settings, build_extractor
        from stcli.jobs.fid import Reference, _reference, cached_reference

        fid = self.recipe.eval.fid
        self.settings = Settings(extractor=fid.extractor, device=self.ctx.device.type,
                                 batch_size=fid.batch_size, resize=fid.resize,
                                 weights=os.environ.get("ST_INCEPTION_WEIGHTS"),
                                 cache_dir=Path(os.environ.get("ST_FID_CACHE", DEFAULT_CACHE)).expanduser()
                                 ).checked()
        self.metrics = tuple(METRICS.validate(m) for m in (("fid", "kid") if fid.kid else ("fid",)))
        self.extractor = build_extractor(self.settings, ("pool",))
        ref = _reference(fid.ref, self.settings, self.recipe)
        self.reference = ref if isinstance(ref, Reference) else \
            cached_reference(ref, self.extractor, self.settings)
        if self.reference.features is None and fid.kid:
            raise UserError("eval.fid.kid needs the reference's features; published mu/sigma "
                            "statistics serve FID only: set eval.fid.kid=false")
        for metric in self.metrics:
            n_ref = len(self.reference.features) if self.reference.features is not None else fid.train_n
            metric.check(fid.train_n, n_ref)

    @torch.no_grad()
    def __call__(self, model, step: int) -> dict[str, float]:
        """The metrics of `model` (the EMA model, in eval mode) at `step`, on rank 0 ({} on
        the others); a collective: every rank calls it at the same step."""
        images = self._draw(model)
        if not self.ctx.is_main:
            return {}
        return self._measure(images)

    def _draw(self, model) -> torch.Tensor:
        from stcli.infra.seeding import generator
        from stcli.jobs.sample import grid_share, padded_score

        n, batch = self.recipe.eval.fid.train_n, self.recipe.eval.fid.batch_size
        rows, data, sde, device = grid_share(n, self.ctx), self.recipe.data, self.recipe.sde, self.ctx.device
        parts = []
        for lo in range(rows.start, rows.stop, batch):
            indices = range(lo, min(lo + batch, rows.stop))
            gens = [generator(device, self.recipe.seed, "eval", i) for i in indices]
            x = torch.stack([sde.prior_sample(data.shape, generator=g, device=device) for g in gens])
            x, _ = self.spec(padded_score(model.score), sde, x, generator=gens)
            parts.append(data.to_uint8(x))
        mine = torch.cat(parts) if parts else torch.zeros((0, *data.shape), dtype=torch.uint8, device=device)
        return distributed.all_gather_rows(mine.contiguous())

    def _measure(self, images: torch.Tensor) -> dict[str, float]:
        from stcli.components.metrics import extract
        from stcli.jobs.fid import RGB

        dataset = RGB(images.cpu(), "samples")
        features = extract(dataset, self.extractor, self.settings, "samples")
        out: dict[str, float] = {}
        for metric in self.metrics:
            out.update({k: v for k, v in metric.compute(features, self.reference).items() if k in KEYS})
        return out
