"""Probability-flow ODE samplers: dx/dt = f(x, t) - 1/2 g(t)^2 s(x, t) (Song et al. 2021,
Eq. 13), integrated from T to eps with the solvers of `stcli.infra.solvers`.  Deterministic: the
only randomness is the prior draw x_T.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveFloat, PositiveInt

from stcli.components.samplers.base import GridSampler, Sampler, Schedule, ScoreFn
from stcli.components.sdes import LinearSDE, bcast, flow_drift
from stcli.infra import solvers
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS


def probability_flow(score_fn: ScoreFn, sde: LinearSDE):
    """The right-hand side (t, x) -> f(x, t) - 1/2 g^2(t) s(x, t); t scalar or per sample."""

    def rhs(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t = t.expand(x.shape[0])
        return flow_drift(score_fn, sde, x, t)

    return rhs


def scaled_flow(score_fn: ScoreFn, sde: LinearSDE):
    """The probability-flow ODE in Karras et al. (2022)'s variables x~ = x/mu, sigma~ = sigma/mu
    = exp(A(t)/2) (their Eq. 4 with s(t) = mu(t)):  dx~/dsigma~ = -sigma~ mu s(mu x~, t) = eps_hat,
    the predicted noise.  Its Euler step is DDIM's; for sigma~ much larger than the data the
    solution is linear in sigma~, so few steps suffice (steps in t would be far from linear)."""

    def rhs(sig: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        t = sde.antiderivative_inv(2 * torch.log(sig)).clamp(sde.eps, sde.T).expand(xs.shape[0])
        mu = bcast(sde.mean_coef(t), xs)
        return -bcast(sig, xs) * mu * score_fn(mu * xs, t)

    return rhs


def solve_scaled(solver, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, ts: list[float]):
    """x at ts[-1] from x at ts[0], by `solver` on the grid sigma~(ts) of the scaled flow."""
    tt = torch.tensor(ts, dtype=torch.float64)
    sigmas = torch.exp(sde.antiderivative(tt) / 2).tolist()
    mu = sde.mean_coef(tt[[0, -1]]).tolist()
    xs, nfe = solver(scaled_flow(score_fn, sde), x / mu[0], sigmas)
    return mu[1] * xs, nfe


@SAMPLERS.register
class ODE(Sampler):
    """Adaptive Dormand–Prince 5(4) on the probability-flow ODE (score_sde's RK45 sampler).

    Each sample has its own step sizes and error norm (``per_sample``), so a sample does not
    depend on its batch; NFE is the number of batched score evaluations."""

    name: Literal["ode"] = "ode"
    rtol: PositiveFloat = 1e-5
    atol: PositiveFloat = 1e-5
    max_steps: PositiveInt = 100_000

    def integrate(self, score_fn, sde, x, generator):
        try:
            return solvers.dopri5(probability_flow(score_fn, sde), x, sde.T, sde.eps, rtol=self.rtol,
                                  atol=self.atol, max_steps=self.max_steps, per_sample=True)
        except solvers.StepLimitError as err:
            raise UserError(f"the ode sampler {err}: raise max_steps or loosen rtol/atol") from None


@SAMPLERS.register
class Euler(GridSampler):
    """Fixed-step Euler on the scaled probability-flow ODE (DDIM): NFE = steps (first order)."""

    name: Literal["euler"] = "euler"
    steps: PositiveInt = 100
    schedule: Schedule = "edm"

    def integrate(self, score_fn, sde, x, generator):
        return solve_scaled(solvers.euler, score_fn, sde, x, self.time_grid(sde))


@SAMPLERS.register
class Heun(GridSampler):
    """Fixed-step Heun on the scaled probability-flow ODE (Karras et al. 2022, Alg. 1):
    NFE = 2 steps (second order)."""

    name: Literal["heun"] = "heun"
    steps: PositiveInt = 50
    schedule: Schedule = "edm"

    def integrate(self, score_fn, sde, x, generator):
        return solve_scaled(solvers.heun, score_fn, sde, x, self.time_grid(sde))
