"""Time steps chosen per model: the grid on which a few-step probability-flow sampler comes
closest to the converged flow, measured on calibration draws (`st tune-steps`).

A grid is a warp of a schedule (`base.grid_times`, u in [0, 1] from T to eps): the i-th of N
steps ends at u_i = Q(i/N), with Q the quantile function of the density on [0, 1]

    q(u) ∝ exp(l(u)),   l piecewise linear through the knots (k/(K-1), c_k), c_0 = 0,      (1)

so c = 0 is the schedule itself and K - 1 numbers move steps between the ends and the middle
of the path.  The c that minimises the RMSE of the sampler's x_eps to a reference solution
(adaptive dopri5 at a tight tolerance, from the same prior draws) is found by compass search
(Kolda, Lewis & Torczon 2003, Sec. 3): try +-step along each coordinate, move to the first
improvement, halve the step when none improves.  Derivative-free, deterministic, and it never
returns a grid worse (on the calibration draws) than the one it starts from.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from stcli.components.samplers.base import Schedule, grid_times
from stcli.components.sdes import LinearSDE

KNOTS = 5  # K of Eq. (1): four free numbers, whatever the step count
FINE = 4096  # intervals of the numerical CDF of q


def warp(c: Sequence[float], steps: int) -> torch.Tensor:
    """u_i = Q(i/steps), i = 0..steps, of Eq. (1) (float64; u_0 = 0, u_steps = 1)."""
    knots = torch.tensor([0.0, *c], dtype=torch.float64)
    u = torch.linspace(0, 1, FINE + 1, dtype=torch.float64)
    pos = u * (len(knots) - 1)
    k = pos.floor().clamp(max=len(knots) - 2).long()
    log_q = knots[k] + (pos - k) * (knots[k + 1] - knots[k])
    q = torch.exp(log_q - log_q.max())
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((q[1:] + q[:-1]) / 2, 0)])
    cdf = cdf / cdf[-1]
    v = torch.arange(steps + 1, dtype=torch.float64) / steps
    j = torch.searchsorted(cdf, v).clamp(1, FINE)  # cdf[j-1] < v <= cdf[j]
    frac = (v - cdf[j - 1]) / (cdf[j] - cdf[j - 1])
    out = u[j - 1] + frac * (u[j] - u[j - 1])
    out[0], out[-1] = 0.0, 1.0
    return out


def warped_times(sde: LinearSDE, steps: int, schedule: Schedule, rho: float,
                 c: Sequence[float]) -> list[float]:
    """The steps + 1 times of the schedule warped by c (Eq. 1), T first and eps last."""
    ts = grid_times(sde, warp(c, steps), schedule, rho)
    ts[0], ts[-1] = sde.T, sde.eps
    return ts.tolist()


def compass_search(f: Callable[[list[float]], float], x0: Sequence[float], step: float = 1.0,
                   min_step: float = 1 / 16, budget: int = 200) -> tuple[list[float], float, int]:
    """A local minimum of f near x0 by compass search: (x, f(x), evaluations of f)."""
    x, fx, evals = list(x0), f(list(x0)), 1
    while step >= min_step and evals < budget:
        for i in range(len(x)):
            for sign in (1.0, -1.0):
                if evals >= budget:
                    return x, fx, evals
                trial = x[:i] + [x[i] + sign * step] + x[i + 1:]
                ft, evals = f(trial), evals + 1
                if ft < fx:
                    x, fx = trial, ft
                    break
            else:
                continue
            break
        else:
            step /= 2  # no coordinate improved: refine
    return x, fx, evals


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Root mean square of x - ref over every sample and coordinate."""
    return (x.double() - ref.double()).pow(2).mean().sqrt().item()
