"""What every sampler shares: the call signature and the final Tweedie denoising step."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import PositiveInt

from stcli.registry import Component
from stcli.sdes import LinearSDE, _bcast

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Sampler(Component):
    """Integrates from T down to the SDE's eps; `denoise` adds a Tweedie step at eps."""

    steps: PositiveInt = 1000
    denoise: bool = True

    def __call__(self, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def time_grid(self, sde: LinearSDE) -> list[float]:
        """steps + 1 times from T down to eps, evenly spaced."""
        return torch.linspace(sde.T, sde.eps, self.steps + 1, dtype=torch.float64).tolist()


def tweedie(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x0 | x_t] = (x_t + sigma^2 s(x_t, t)) / mu (Tweedie's formula)."""
    tt = torch.full((x.shape[0],), t, device=x.device)
    return (x + _bcast(sde.var(tt), x) * score_fn(x, tt)) / _bcast(sde.mean_coef(tt), x)
