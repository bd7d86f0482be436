"""Predictor–corrector samplers of the reverse SDE dx = [f - g^2 s] dt + g dw (Song et al.
2021, Eq. 6 and Algs. 2–5), run on a fixed time grid from T to eps.

At each grid time t_i the corrector runs first, then the predictor moves to t_{i+1} (the
order of score_sde's ``pc_sampler``).  Between grid points the forward process is the exact
transition x_t = a x_{t'} + G z with a = mu(t)/mu(t') and G^2 = sigma^2(t) - a^2 sigma^2(t')
(t > t'); it is score_sde's discretisation of VE (a = 1, G^2 = sigma_i^2 - sigma_{i-1}^2) and
of VP (a = sqrt(1 - beta_i), G^2 = beta_i), defined for every linear SDE.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveFloat, PositiveInt

from stcli.components.samplers.base import Generators, GridSampler, ScoreFn, randn_like, times
from stcli.components.sdes import LinearSDE, bcast
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS
from stcli.infra.solvers import row_sum_squares


def transition(sde: LinearSDE, t: float, t_next: float) -> tuple[float, float, float]:
    """(a, G^2, sigma^2(t')) of the forward step from t' = t_next to t: x_t = a x_t' + G z."""
    tt = torch.tensor([t, t_next], dtype=torch.float64)
    mu, var = sde.mean_coef(tt).tolist(), sde.var(tt).tolist()
    a = mu[0] / mu[1]
    return a, var[0] - a * a * var[1], var[1]


# --- predictors: x at t -> x at t_next < t, one score evaluation each -------------------------
def euler_maruyama(score_fn: ScoreFn, sde: LinearSDE, x, t: float, t_next: float, gen):
    """x' = x + [f - g^2 s] dt + g sqrt(-dt) z, dt = t_next - t < 0 (Song et al. Eq. 6)."""
    dt, tt = t_next - t, times(t, x)
    g2 = bcast(sde.g2(tt), x)
    x_mean = x + (sde.drift(x, tt) - g2 * score_fn(x, tt)) * dt
    return x_mean + torch.sqrt(g2 * -dt) * randn_like(x, gen)


def reverse_diffusion(score_fn: ScoreFn, sde: LinearSDE, x, t: float, t_next: float, gen):
    """x' = x - f_i(x) + G^2 s + G z with f_i(x) = (a - 1) x (Song et al. Eq. 46)."""
    a, G2, _ = transition(sde, t, t_next)
    return (2 - a) * x + G2 * score_fn(x, times(t, x)) + G2**0.5 * randn_like(x, gen)


def ancestral(score_fn: ScoreFn, sde: LinearSDE, x, t: float, t_next: float, gen):
    """The discrete ancestral step (Song et al. App. F): for mu = 1 (VE, RVE, EDM), Eq. (47)
    x' = x + (s_t^2 - s'^2) s + sqrt(s'^2 (s_t^2 - s'^2) / s_t^2) z; for mu^2 + sigma^2 = 1
    (VP), DDPM's x' = (x + beta s) / sqrt(1 - beta) + sqrt(beta) z with 1 - beta = a^2 (Ho et
    al. Eq. 11)."""
    a, G2, var_next = transition(sde, t, t_next)
    s = score_fn(x, times(t, x))
    if sde.unit_mean:
        return x + G2 * s + (var_next * G2 / (var_next + G2)) ** 0.5 * randn_like(x, gen)
    beta = 1 - a * a  # variance preserving
    return (x + beta * s) / a + beta**0.5 * randn_like(x, gen)


PREDICTORS = {"euler_maruyama": euler_maruyama, "reverse_diffusion": reverse_diffusion,
              "ancestral": ancestral}


def langevin(score_fn: ScoreFn, sde: LinearSDE, x, t: float, t_next: float, gen, snr: float):
    """One Langevin corrector step (Song et al. Algs. 4 and 5):
    eps = 2 alpha (snr ||z|| / ||s||)^2, x' = x + eps s + sqrt(2 eps) z, alpha = a^2 (1 - beta_i
    for VP, 1 for VE/RVE).  Norms are per sample (score_sde averages them over the batch,
    which would make a sample depend on its batch)."""
    a, _, _ = transition(sde, t, t_next)
    s, z = score_fn(x, times(t, x)), randn_like(x, gen)
    ratio2 = row_sum_squares(z) / row_sum_squares(s)  # (||z|| / ||s||)^2 per sample
    step = bcast(2 * a * a * snr**2 * ratio2, x)
    return x + step * s + torch.sqrt(2 * step) * z


def pc_loop(score_fn: ScoreFn, sde: LinearSDE, x, gen: Generators, grid: list[float],
            predictor: str, corrector_steps: int, snr: float) -> tuple[torch.Tensor, int]:
    """Corrector (`corrector_steps` Langevin steps) then predictor at every grid time."""
    step = PREDICTORS[predictor]
    for t, t_next in zip(grid[:-1], grid[1:]):
        for _ in range(corrector_steps):
            x = langevin(score_fn, sde, x, t, t_next, gen, snr)
        x = step(score_fn, sde, x, t, t_next, gen)
    return x, (len(grid) - 1) * (1 + corrector_steps)


@SAMPLERS.register
class PC(GridSampler):
    """Predictor–corrector sampling; NFE = steps (1 + n_corrector) (+1 with denoise)."""

    name: Literal["pc"] = "pc"
    predictor: Literal["euler_maruyama", "reverse_diffusion", "ancestral"] = "reverse_diffusion"
    corrector: Literal["langevin", "none"] = "langevin"
    snr: PositiveFloat = 0.16  # score_sde: 0.01 to 0.16; `check` refuses above 1
    n_corrector: PositiveInt = 1

    def check(self, sde) -> None:
        super().check(sde)
        if self.snr > 1 and self.corrector == "langevin":
            raise UserError(f"sampler.snr {self.snr:g} is above 1 (score_sde uses 0.01 to 0.16): "
                            "the Langevin step's noise would outweigh the score")
        self._predictor_defined(sde)

    def _predictor_defined(self, sde) -> None:
        if self.predictor == "ancestral" and not (sde.unit_mean or sde.variance_preserving):
            raise UserError(f"the ancestral predictor is defined for SDEs with mu = 1 or "
                            f"mu^2 + sigma^2 = 1 (Song et al. 2021, App. F), not {sde.name!r}; use "
                            "predictor reverse_diffusion or euler_maruyama")

    def ignored(self) -> dict[str, str]:
        return {**super().ignored(), **({k: "corrector none runs no Langevin corrector"
                                         for k in ("snr", "n_corrector")}
                                        if self.corrector == "none" else {})}

    def integrate(self, score_fn, sde, x, generator):
        self._predictor_defined(sde)  # the step's formula, whoever calls (check: the rest)
        n = self.n_corrector if self.corrector == "langevin" else 0
        return pc_loop(score_fn, sde, x, generator, self.time_grid(sde), self.predictor, n,
                       self.snr)


@SAMPLERS.register
class EulerMaruyama(GridSampler):
    """Euler–Maruyama on the reverse SDE: `pc` with predictor euler_maruyama, corrector none."""

    name: Literal["euler_maruyama"] = "euler_maruyama"

    def integrate(self, score_fn, sde, x, generator):
        return pc_loop(score_fn, sde, x, generator, self.time_grid(sde), "euler_maruyama", 0, 0.0)
