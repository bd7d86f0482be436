"""Stable Target Field (seed 002): the target of the loss with x0 replaced by a
self-normalised importance-weighted average over a reference batch of clean images.

The component declares what it needs from the trainer (a `Feed`: `reference_batch` images per
rank or gathered from every rank, the batch's own included) and keeps its own statistic, the
effective sample size of the weights per sigma bin, logged as `stf_ess`.  The reference images
of step k are drawn from (seed, "reference", k[, rank]), so a resumed run replays them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import PositiveInt

from stcli.components.targets import Target
from stcli.infra import distributed
from stcli.infra.errors import UserError
from stcli.infra.registry import TARGETS
from stcli.infra.seeding import generator


def stf_weights(x_t: torch.Tensor, mean_coef: torch.Tensor, std: torch.Tensor,
                reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """w_ij = softmax_j(-||x_i - mu_i y_j||^2 / (2 sigma_i^2)), float64, shape (B, n).

    -||x_i - mu y_j||^2/(2 sigma^2) = (mu/sigma^2) x_i.y_j - (mu^2/(2 sigma^2)) ||y_j||^2 + c_i,
    where c_i does not depend on j and drops out of the softmax: the logits are one matmul of
    [x_i mu/sigma^2, -mu^2/(2 sigma^2)] with [y_j, ||y_j||^2] per chunk of the reference
    (converted to float64 a chunk at a time): memory O(B n + chunk d), never B x n x d.
    """
    x = x_t.detach().flatten(1).double()
    mu, var = mean_coef.double()[:, None], std.double().pow(2)[:, None]
    lhs = torch.cat([x * (mu / var), -0.5 * mu.pow(2) / var], 1)
    logits = torch.cat([
        lhs @ torch.cat([y, y.pow(2).sum(1, keepdim=True)], 1).T
        for y in (c.detach().flatten(1).double() for c in reference.split(chunk))
    ], dim=1)
    return torch.softmax(logits, dim=1)


def stf_mean(weights: torch.Tensor, reference: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """T_i = sum_j w_ij y_j in float64, shape (B, d), a chunk of the reference at a time."""
    out = None
    for w, y in zip(weights.split(chunk, dim=1), reference.split(chunk)):
        part = w @ y.detach().flatten(1).double()
        out = part if out is None else out.add_(part)
    return out


def stf_target(x_t: torch.Tensor, mean_coef: torch.Tensor, std: torch.Tensor,
               reference: torch.Tensor) -> torch.Tensor:
    """The stable target T_i = sum_j w_ij y_j (seed 002), shape and dtype of x_t."""
    with torch.autocast(x_t.device.type, enabled=False):
        w = stf_weights(x_t, mean_coef, std, reference)
        return stf_mean(w, reference).to(x_t.dtype).view_as(x_t)


def effective_sample_size(weights: torch.Tensor) -> torch.Tensor:
    """ESS_i = 1 / sum_j w_ij^2: from 1 (one reference dominates) to n (uniform weights)."""
    return weights.pow(2).sum(1).reciprocal()


@TARGETS.register
class STF(Target):
    """Stable Target Field: x0 in the target replaced by T_i over a reference batch of
    `reference_batch` clean images (the batch's own included), per rank or, with
    `all_gather`, gathered from every rank (then `reference_batch` counts all ranks)."""

    name: Literal["stf"] = "stf"
    reference_batch: PositiveInt = 1024
    all_gather: bool = False

    def feed(self, sde, eps: float, per_rank: int, world: int, n_items: int,
             device: torch.device) -> ReferenceFeed:
        """The reference images each rank loads beyond its batch; checks they exist."""
        n = self.reference_batch
        if self.all_gather and n % world:
            raise UserError(f"loss.target.reference_batch={n} must be divisible by the number of "
                            f"processes ({world}) when loss.target.all_gather is true")
        n_rank = n // world if self.all_gather else n
        if n_rank < per_rank:
            raise UserError(f"loss.target.reference_batch={n} is smaller than the batch it must "
                            f"contain ({per_rank * (world if self.all_gather else 1)} images)")
        if n > n_items:
            raise UserError(f"loss.target.reference_batch={n} exceeds the {n_items} "
                            "images of the training set")
        return ReferenceFeed(n_rank - per_rank, self.all_gather, EssBins(sde, eps, device))

    def noise_target(self, x_t, x0, z, mean, std, reference=None) -> torch.Tensor:
        """(x_t - mu T)/sigma = z + mu (x0 - T)/sigma, evaluated in float64 in the second form,
        which has no cancellation at small sigma and equals z exactly when T = x0.
        `reference`: the images (a tensor) or a `Reference` that also collects the ESS."""
        if reference is None:
            raise ValueError("the stf target needs a reference batch")
        bins = reference.ess if isinstance(reference, Reference) else None
        if bins is not None:
            reference = reference.images
        with torch.autocast(x_t.device.type, enabled=False):
            w = stf_weights(x_t, mean, std, reference)
            gap = x0.detach().flatten(1).double() - stf_mean(w, reference)
            coef = (mean.double() / std.double())[:, None]
            target = (z.flatten(1).double() + coef * gap).to(z.dtype).view_as(z)
        if bins is not None:
            bins.add(std.detach(), effective_sample_size(w))
        return target


@dataclass
class Reference:
    """A step's reference images and the ESS bins that collect its weights' statistics."""

    images: torch.Tensor
    ess: EssBins | None = None


@dataclass
class ReferenceFeed:
    """The trainer's side of STF: `extra` images per rank beyond the batch, gathered or not."""

    extra: int
    gather: bool
    ess: EssBins

    def batches(self, steps) -> ReferenceBatches:
        return ReferenceBatches(steps, self.extra, self.gather)

    def reference(self, parts: list[torch.Tensor]) -> Reference:
        """This rank's batch then its extra images; gathered from every rank if asked."""
        images = torch.cat(parts)
        return Reference(distributed.all_gather_equal(images) if self.gather else images, self.ess)

    def flush(self) -> dict:
        return {"stf_ess": self.ess.flush()}


class ReferenceBatches:
    """The reference images of each step beyond the minibatch: `extra` distinct indices per
    rank, none in the batch.  With `gather`, the ranks draw one common set (keyed by the step
    alone) that excludes the global batch and take disjoint slices of it, so the gathered
    reference holds `world x (per-rank batch + extra)` distinct images.  `batches` is the
    trainer's StepBatches (global_batches, n, batch, seed, start, ctx)."""

    def __init__(self, batches, extra: int, gather: bool):
        self.batches, self.extra, self.gather = batches, extra, gather

    def __iter__(self) -> Iterator[list[int]]:
        b, ctx = self.batches, self.batches.ctx
        per_rank = b.batch // ctx.world_size
        for step, batch in enumerate(b.global_batches(), start=b.start):
            if self.gather:
                g = generator(torch.device("cpu"), b.seed, "reference", step)
                chosen = distinct_indices(b.n, self.extra * ctx.world_size, batch.tolist(), g)
                yield chosen[ctx.rank * self.extra:(ctx.rank + 1) * self.extra]
            else:
                g = generator(torch.device("cpu"), b.seed, "reference", step, ctx.rank)
                own = batch[ctx.rank * per_rank:(ctx.rank + 1) * per_rank].tolist()
                yield distinct_indices(b.n, self.extra, own, g)


def distinct_indices(n: int, k: int, exclude: list[int], g: torch.Generator) -> list[int]:
    """k distinct indices of range(n), none in `exclude`, uniformly at random (by rejection:
    O(k) when k is small against n, never a permutation of all n)."""
    chosen, seen = [], set(exclude)
    while len(chosen) < k:
        for i in torch.randint(n, (2 * (k - len(chosen)) + 16,), generator=g).tolist():
            if i not in seen:
                seen.add(i)
                chosen.append(i)
                if len(chosen) == k:
                    break
    return chosen


class EssBins:
    """Mean STF effective sample size per sigma bin (8 log-spaced bins from sigma(eps) to
    sigma(T)), summed over the ranks since the last flush; accumulated on the device."""

    def __init__(self, sde, eps: float, device: torch.device, bins: int = 8):
        lo, hi = (float(sde.std(torch.tensor([t], dtype=torch.float64))) for t in (eps, sde.T))
        self.edges = torch.logspace(math.log10(lo), math.log10(hi), bins + 1, dtype=torch.float64)
        self.inner = self.edges[1:-1].to(device)
        self.sums = torch.zeros(2, bins, dtype=torch.float64, device=device)

    def add(self, sigma: torch.Tensor, ess: torch.Tensor) -> None:
        i = torch.bucketize(sigma.double(), self.inner)
        self.sums[0].index_add_(0, i, ess.double())
        self.sums[1].index_add_(0, i, torch.ones_like(ess, dtype=torch.float64))

    def flush(self) -> dict:
        """{"sigma": bin edges, "ess": mean per bin (None where empty), "count": samples}."""
        total, count = distributed.all_reduce_sum(self.sums).tolist()
        self.sums.zero_()
        return {"sigma": [round(e, 6) for e in self.edges.tolist()],
                "ess": [s / c if c else None for s, c in zip(total, count)],
                "count": [int(c) for c in count]}
