"""The denoising target of the loss, and what a target may ask of the trainer.

The loss regresses eps_theta(x_t, t) onto a target that is the noise z itself (`dsm`) or an
estimate of it with lower variance (`stf`, in stcli.components.stf).  A target that needs more than the
minibatch says so with `feed`: the trainer then loads the reference images it asks for, hands
them to `feed.reference` every step, passes the result to the loss, and logs `feed.flush()`.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

from stcli.infra.registry import TARGETS, Component


class Feed(Protocol):
    """What a target needs from the trainer: `extra` reference images per rank beyond the
    rank's batch (0: the batch alone), turned into the loss's `reference` by `reference`."""

    extra: int

    def batches(self, steps) -> Any:
        """Per step, the dataset indices of this rank's extra images (a batch sampler)."""

    def reference(self, parts: list[torch.Tensor]) -> Any:
        """The loss's `reference` argument from this rank's batch and extra images."""

    def flush(self) -> dict:
        """Log fields for the steps since the last flush (all ranks call it together)."""


class Target(Component):
    """Base of the target components: the noise target and what it needs from the trainer."""

    def feed(self, sde, eps: float, per_rank: int, world: int, n_items: int,
             device: torch.device) -> Feed | None:
        """None: the target needs nothing but the minibatch."""
        return None

    def noise_target(self, x_t, x0, z, mean, std, reference=None) -> torch.Tensor:
        raise NotImplementedError


@TARGETS.register
class DSM(Target):
    """The ordinary denoising target: the noise z itself."""

    name: Literal["dsm"] = "dsm"

    def noise_target(self, x_t, x0, z, mean, std, reference=None) -> torch.Tensor:
        return z
