"""Samplers: registry entries with one call signature, sampler(score_fn, sde, x_T, generator=...)."""

from stcli.samplers import euler_maruyama  # noqa: F401
