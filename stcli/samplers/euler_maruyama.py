"""Euler–Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dw, t from T to eps (Eq. 3)."""

from __future__ import annotations

from typing import Literal

import torch

from stcli.registry import SAMPLERS
from stcli.samplers.base import Sampler, tweedie
from stcli.sdes import _bcast


@SAMPLERS.register
class EulerMaruyama(Sampler):
    name: Literal["euler_maruyama"] = "euler_maruyama"

    @torch.no_grad()
    def __call__(self, score_fn, sde, x, generator=None):
        grid = self.time_grid(sde)
        for t_now, t_next in zip(grid[:-1], grid[1:]):
            dt = t_next - t_now  # negative: backwards in time
            t = torch.full((x.shape[0],), t_now, device=x.device)
            g2 = _bcast(sde.g2(t), x)
            drift = sde.drift(x, t) - g2 * score_fn(x, t)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + drift * dt + torch.sqrt(g2 * -dt) * noise
        return tweedie(score_fn, sde, x, sde.eps) if self.denoise else x
