"""Samplers: registry entries with one call signature,
``sampler(score_fn, sde, x_T, generator=None) -> (x, nfe)`` (see `stcli.components.samplers.base`)."""

from stcli.components.samplers import dpm, ode, pc, unipc  # noqa: F401  (register pc, euler_maruyama, ode, euler, heun, dpm2m, unipc)
from stcli.components.samplers.base import Sampler, randn_like, time_grid, tweedie  # noqa: F401
