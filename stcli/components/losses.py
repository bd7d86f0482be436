"""Denoising score matching with importance-sampled time, Soft Truncation and R_eps.

With x_t = mu(t) x0 + sigma(t) z and the noise-predicting net eps_theta = -sigma s_theta, every
weighting lambda and time density p(t) on [tau, T] gives the per-sample Monte Carlo loss

    l = 1/2 * lambda(t) / (sigma^2(t) p(t)) * ||eps_theta(x_t, t) - z||^2,

an unbiased estimate of L(theta; lambda, tau) = 1/2 int_tau^T lambda E||s_theta - grad log p_0t||^2 dt.
p(t) = q(t)/N with q = g^2/sigma^2, N = Z_tau for importance sampling (Eq. 9) and q = 1,
N = T - tau for uniform sampling.  Soft Truncation draws tau ~ P once per step (Sec. 4.2);
`g2_P` is lambda = F_P(t) g^2(t), its expectation (Eq. 10).  `lognormal` time sampling draws
log(sigma/mu) ~ N(m, s^2) restricted to [tau, T] (Karras et al. 2022); with it, weighting `edm`
is their objective E_sigma[lambda(sigma) ||D - x0||^2] = E[(s^2 + sd^2)/sd^2 ||eps - z||^2].

The denoising target is a component (stcli.components.targets): z itself (`dsm`) or the Stable Target
Field target (`stf`, stcli.components.stf).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import PositiveFloat, model_validator

from stcli.components import truncation  # noqa: F401  (registers the truncation specs used below)
from stcli.components.likelihood import reconstruction_from_noise
from stcli.components.sdes import LinearSDE, bcast, sum_squares
from stcli.components.targets import DSM
from stcli.infra.registry import TARGETS, TRUNCATIONS, Strict, live_unions

TruncationSpec = TRUNCATIONS.union()


@live_unions(weighting_P=TRUNCATIONS, target=TARGETS)
class ScoreMatchingLoss(Strict):
    """The `loss:` section of a recipe, callable on a batch."""

    weighting: Literal["likelihood", "variance", "g2_P", "edm"] = "likelihood"
    weighting_P: TruncationSpec | None = None  # P of lambda = g^2_P (Eq. 10)
    time_sampling: Literal["importance", "uniform", "lognormal"] = "importance"
    lognormal_mean: float = -1.2  # of log(sigma/mu) under lognormal time sampling (EDM P_mean)
    lognormal_std: PositiveFloat = 1.2  # (EDM P_std)
    sigma_data: PositiveFloat = 0.5  # of the edm weighting
    reduce: Literal["mean", "sum"] = "sum"
    reconstruction: bool = False  # add R_tau (Eq. 7) at the step's tau
    scale_by_Z: bool = True  # multiply by the normaliser N (Eq. 9); RVE reproductions set false
    target: TARGETS.union() = DSM()

    @model_validator(mode="after")
    def _needs_P(self):
        if (self.weighting == "g2_P") != (self.weighting_P is not None):
            raise ValueError("weighting g2_P needs weighting_P (and weighting_P needs g2_P)")
        if self.weighting == "edm" and self.time_sampling != "lognormal":
            raise ValueError("weighting edm is defined with time_sampling lognormal")
        return self

    def weight(self, sde: LinearSDE, t: torch.Tensor, tau: float) -> torch.Tensor:
        """N lambda(t) / (sigma^2(t) q(t)), the factor of 1/2 ||eps_hat - target||^2 (Eq. 9)."""
        t64 = t.double()
        if self.weighting == "edm":  # lambda sigma~^2 = (s^2 + sd^2)/sd^2 (Karras et al. Eq. 8)
            s2 = torch.exp(sde.antiderivative(t64))
            return ((s2 + self.sigma_data**2) / self.sigma_data**2).to(t.dtype)
        ratio = self.lam(sde, t64) / (sde.var(t64) * self.q(sde, t64, tau))
        return (self.norm(sde, tau) * ratio).to(t.dtype)

    def lam(self, sde: LinearSDE, t: torch.Tensor) -> torch.Tensor:
        """The weighting lambda(t): g^2 (likelihood, Eq. 3), sigma^2 (variance) or g^2_P (Eq. 10)."""
        if self.weighting == "likelihood":
            return sde.g2(t)
        if self.weighting == "variance":
            return sde.var(t)
        return self.weighting_P.cdf(t) * sde.g2(t)

    def q(self, sde: LinearSDE, t: torch.Tensor, tau: float) -> torch.Tensor:
        """The time density up to the normaliser N, p(t) = q(t)/N on [tau, T]: g^2/sigma^2 for
        importance sampling (Eq. 9), 1 for uniform, the restricted log-normal density itself."""
        if self.time_sampling == "importance":
            return sde.g2(t) / sde.var(t)
        if self.time_sampling == "uniform":
            return torch.ones_like(t)
        # log-normal: p(t) = phi(u)/(s mass) d(A/2)/dt, u the standardised A(t)/2, dA/dt = g^2/sigma^2
        u = (sde.antiderivative(t) / 2 - self.lognormal_mean) / self.lognormal_std
        mass = self._lognormal_bounds(sde, tau)[1]
        phi = torch.exp(-0.5 * u * u) / math.sqrt(2 * math.pi)
        return phi / (self.lognormal_std * mass) * sde.g2(t) / sde.var(t) / 2

    def norm(self, sde: LinearSDE, tau: float) -> float:
        """N: Z_tau (importance, Eq. 9), T - tau (uniform), 1 (log-normal or scale_by_Z false)."""
        if not self.scale_by_Z or self.time_sampling == "lognormal":
            return 1.0
        return float(sde.importance_Z(tau)) if self.time_sampling == "importance" else sde.T - tau

    def _lognormal_bounds(self, sde: LinearSDE, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised log(sigma/mu) = A(t)/2 at tau and T, and their normal CDFs' gap."""
        a = sde.antiderivative(torch.tensor([tau, sde.T], dtype=torch.float64)) / 2
        lo, hi = (a - self.lognormal_mean) / self.lognormal_std
        return lo, torch.special.ndtr(hi) - torch.special.ndtr(lo)

    def sample_time(self, sde: LinearSDE, n: int, tau: float, generator, device) -> torch.Tensor:
        if self.time_sampling == "importance":
            return sde.sample_time(n, tau, generator=generator, device=device)[0]
        if self.time_sampling == "lognormal":  # inverse CDF of the normal restricted to [tau, T]
            lo, mass = self._lognormal_bounds(sde, tau)
            u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
            z = torch.special.ndtri(torch.special.ndtr(lo).to(device) + u * mass.to(device))
            a = 2 * (self.lognormal_mean + self.lognormal_std * z)
            return sde.antiderivative_inv(a).clamp(tau, sde.T).float()
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return (tau + u * (sde.T - tau)).float()

    def _sq(self, err: torch.Tensor) -> torch.Tensor:
        """||err||^2 per sample, or its mean over dimensions with reduce: mean."""
        return sum_squares(err) / (1 if self.reduce == "sum" else err[0].numel())

    def __call__(self, model, sde: LinearSDE, x0: torch.Tensor, tau: float, generator=None,
                 reference=None) -> torch.Tensor:
        """Per-sample loss, shape (B,). `model(x, t)` predicts the noise; `reference` is what
        the target's feed made of the step's reference images (see stcli.components.targets)."""
        return self.with_times(model, sde, x0, tau, generator, reference)[0]

    def with_times(self, model, sde: LinearSDE, x0: torch.Tensor, tau: float, generator=None,
                   reference=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample loss, the diffusion time t ~ p(t) on [tau, T] of each sample)."""
        n, device = x0.shape[0], x0.device
        t = self.sample_time(sde, n, tau, generator, device)
        z = torch.randn(x0.shape, generator=generator, device=device, dtype=x0.dtype)
        mean, std = sde.mean_coef(t), sde.std(t)
        x_t = bcast(mean, x0) * x0 + bcast(std, x0) * z
        target = self.target.noise_target(x_t, x0, z, mean, std, reference)
        loss = 0.5 * self.weight(sde, t, tau) * self._sq(model(x_t, t) - target)
        if self.reconstruction:
            loss = loss + self.reconstruction_term(model, sde, x0, tau, generator)
        return loss, t

    def reconstruction_term(self, model, sde: LinearSDE, x0, tau: float, generator=None):
        """R_tau (Eq. 7) with the Tweedie decoder at the step's tau; per dimension with reduce: mean."""
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        rec = reconstruction_from_noise(model, sde, x0, z, tau)
        return rec if self.reduce == "sum" else rec / x0[0].numel()
