"""Linear SDEs dx = -1/2 beta(t) x dt + g(t) dw (Eq. 4) and importance sampling of t.

Each SDE gives its transition N(mu(t) x0, sigma^2(t) I) (Eq. 16) in closed form, and the
antiderivative A(t) of g^2/sigma^2.  Since d sigma^2/dt = -beta sigma^2 + g^2 (Eq. 14),

    g^2/sigma^2 = d/dt log sigma^2 + beta   =>   A(t) = log(sigma^2(t) / mu^2(t)),

so the importance distribution p_iw,tau(t) ∝ g^2/sigma^2 on [tau, T] (Sec. 4.1) has
normaliser Z_tau = A(T) - A(tau) and inverse CDF t = A^{-1}(A(tau) + u Z_tau).  Small-t
quantities are computed with expm1/log1p and sampling in float64, where they would cancel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import NonNegativeFloat, PositiveFloat, model_validator

from stcli.infra.registry import SDES, Component

TIME_INPUTS = ("t999", "log_sigma", "unbounded", "int_g2_sigma2")
SIGMA0 = 0.01  # UNCSN++ switch point sigma_0 (App. C.1)


def _t(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t if t.is_floating_point() else t.double()
    return torch.as_tensor(t, dtype=torch.float64)


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # s(x, t) ~ grad_x log p_t(x)


class LinearSDE(Component):
    """Shared behaviour of the linear SDEs; subclasses give the closed forms."""

    T: ClassVar[float] = 1.0
    unit_mean: ClassVar[bool] = False  # mu(t) = 1 for every t (VE-like)
    variance_preserving: ClassVar[bool] = False  # mu^2(t) + sigma^2(t) = 1 for every t (VP)
    eps: PositiveFloat = 1e-5  # the truncation epsilon (the recipe copies truncation.eps here)

    # --- closed forms each SDE defines -----------------------------------------------------
    def log_mean_coef(self, t: torch.Tensor) -> torch.Tensor:  # log mu(t)
        return torch.zeros_like(_t(t))

    def var(self, t: torch.Tensor) -> torch.Tensor:  # sigma^2(t)
        raise NotImplementedError

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(_t(t))

    def g2(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        """A(t) = log(sigma^2/mu^2), so that dA/dt = g^2/sigma^2."""
        t = _t(t)
        return torch.log(self.var(t)) - 2 * self.log_mean_coef(t)

    def antiderivative_inv(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def prior_std(self) -> float:
        return 1.0

    # --- derived quantities ----------------------------------------------------------------
    def mean_coef(self, t) -> torch.Tensor:
        return torch.exp(self.log_mean_coef(_t(t)))

    def std(self, t) -> torch.Tensor:
        return torch.sqrt(self.var(_t(t)))

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        """f(x, t) = -1/2 beta(t) x (Eq. 4); t has shape (B,)."""
        return -0.5 * bcast(self.beta(_t(t)), x) * x

    def diffusion(self, t) -> torch.Tensor:
        return torch.sqrt(self.g2(_t(t)))

    def marginal(self, x0: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t = mu(t) x0 + sigma(t) z."""
        return bcast(self.mean_coef(t), x0) * x0 + bcast(self.std(t), x0) * z

    def prior_sample(self, shape, generator=None, device=None, dtype=torch.float32):
        return self.prior_std * torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """log N(x; 0, prior_std^2 I), summed over all but the batch dimension."""
        d = x[0].numel()
        s2 = self.prior_std**2
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * d * math.log(2 * math.pi * s2) - sq / (2 * s2)

    # --- importance sampling of t (Sec. 4.1) ------------------------------------------------
    def importance_Z(self, tau) -> torch.Tensor:
        """Z_tau = int_tau^T g^2/sigma^2 dt."""
        return self.antiderivative(_t(self.T)) - self.antiderivative(_t(tau))

    def importance_cdf(self, t, tau) -> torch.Tensor:
        a_tau = self.antiderivative(_t(tau))
        return (self.antiderivative(_t(t)) - a_tau) / self.importance_Z(tau)

    def sample_time(self, n: int, tau, generator=None, device=None, dtype=torch.float32):
        """t ~ p_iw,tau(t) ∝ g^2(t)/sigma^2(t) on [tau, T] by inverse CDF; returns (t, Z_tau)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        a_tau = self.antiderivative(_t(tau).to(u.device))
        z = self.importance_Z(_t(tau).to(u.device))
        t = self.antiderivative_inv(a_tau + u * z).clamp(float(tau), self.T)
        return t.to(dtype), z.to(dtype)

    # --- network time inputs eta(t) (App. C.1) ----------------------------------------------
    def time_input(self, t, kind: str) -> torch.Tensor:
        t = _t(t)
        if kind == "t999":
            return 999.0 * t
        if kind == "log_sigma":
            return 0.5 * torch.log(self.var(t))
        if kind == "unbounded":  # log sigma above sigma_0, -c1/sigma + c2 below, C^1 at sigma_0
            sigma = self.std(t)
            c1, c2 = SIGMA0, math.log(SIGMA0) + 1.0
            return torch.where(sigma >= SIGMA0, torch.log(sigma), -c1 / sigma + c2)
        if kind == "int_g2_sigma2":  # uniform under p_iw, scaled to [0, 999] on [eps, T]
            a = self.embedding_antiderivative
            lo, hi = a(_t(self.eps)), a(_t(self.T))
            return 999.0 * (a(t) - lo) / (hi - lo)
        raise ValueError(f"unknown time input {kind!r}; available: {', '.join(TIME_INPUTS)}")

    def embedding_antiderivative(self, t: torch.Tensor) -> torch.Tensor:
        return self.antiderivative(t)


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample (B,) or scalar tensor to broadcast against x of shape (B, ...)."""
    v = v.to(device=x.device, dtype=x.dtype)
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim())) if v.dim() else v


def sum_squares(v: torch.Tensor) -> torch.Tensor:
    """||v||^2 per sample (row), shape (B,): float64 stays float64, anything else is squared
    in float32 (so bf16 activations do not lose the sum)."""
    v = v.flatten(1)
    return (v if v.dtype == torch.float64 else v.float()).pow(2).sum(1)


def flow_drift(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """F(x, t) = f(x, t) - 1/2 g^2(t) s(x, t): the vector field of the probability-flow ODE
    (Song et al. 2021) of the SDE, whose solution has the SDE's marginals; t per sample."""
    return sde.drift(x, t) - 0.5 * bcast(sde.g2(t), x) * score_fn(x, t)


class _SigmaRange(LinearSDE):
    unit_mean: ClassVar[bool] = True
    sigma_min: PositiveFloat = 0.01
    sigma_max: PositiveFloat = 50.0

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_max <= self.sigma_min:
            raise ValueError(f"sigma_max ({self.sigma_max}) must exceed sigma_min ({self.sigma_min})")
        return self

    @property
    def log_r(self) -> float:  # log(sigma_max / sigma_min)
        return math.log(self.sigma_max / self.sigma_min)

    @property
    def prior_std(self) -> float:
        return self.sigma_max


@SDES.register
class VE(_SigmaRange):
    """score_sde's VE: sigma = sigma_min r^t, mu = 1, g^2 = 2 log r sigma^2 (sigma(0) = sigma_min)."""

    name: Literal["ve"] = "ve"

    def var(self, t):
        return self.sigma_min**2 * torch.exp(2 * self.log_r * _t(t))

    def g2(self, t):
        return 2 * self.log_r * self.var(t)

    def antiderivative(self, t):
        return 2 * math.log(self.sigma_min) + 2 * self.log_r * _t(t)

    def antiderivative_inv(self, a):
        return (a - 2 * math.log(self.sigma_min)) / (2 * self.log_r)


@SDES.register
class RVE(_SigmaRange):
    """Reciprocal VE (App. C.2): sigma^2 = sigma_max^2 (sigma_min/sigma_max)^{2(1/t-1/T)/(1/eps-1/T)}."""

    name: Literal["rve"] = "rve"
    sigma_min: PositiveFloat = 1e-3

    @property
    def rate(self) -> float:  # c with log sigma^2 = 2 log sigma_max - c (1/t - 1/T)
        return 2 * self.log_r / (1 / self.eps - 1 / self.T)

    def var(self, t):
        return torch.exp(self.antiderivative(t))

    def g2(self, t):
        t = _t(t)
        return self.var(t) * self.rate / t**2

    def antiderivative(self, t):
        return 2 * math.log(self.sigma_max) - self.rate * (1 / _t(t) - 1 / self.T)

    def antiderivative_inv(self, a):
        return 1 / (1 / self.T + (2 * math.log(self.sigma_max) - a) / self.rate)


@SDES.register
class EDM(LinearSDE):
    """Karras et al. (2022)'s sigma-parametrised VE, sigma(t) = t, on st's time axis [eps, 1]:
    sigma = sigma_max t, mu = 1, g^2 = d sigma^2/dt = 2 sigma_max^2 t; A = 2 log(sigma_max t).
    The probability-flow ODE does not depend on how time is parametrised, so this is EDM's
    ODE; sigma_min = sigma_max eps (EDM: 80 x 2.5e-5 = 0.002)."""

    name: Literal["edm"] = "edm"
    unit_mean: ClassVar[bool] = True
    sigma_max: PositiveFloat = 80.0

    def var(self, t):
        return (self.sigma_max * _t(t)) ** 2

    def g2(self, t):
        return 2 * self.sigma_max**2 * _t(t)

    def antiderivative(self, t):
        return 2 * torch.log(self.sigma_max * _t(t))

    def antiderivative_inv(self, a):
        return torch.exp(a / 2) / self.sigma_max

    @property
    def prior_std(self) -> float:
        return self.sigma_max


class _BetaLinear(LinearSDE):
    beta_min: NonNegativeFloat = 0.1
    beta_max: PositiveFloat = 20.0

    @model_validator(mode="after")
    def _ordered(self):
        if self.beta_max <= self.beta_min:
            raise ValueError(f"beta_max ({self.beta_max}) must exceed beta_min ({self.beta_min})")
        return self

    def B(self, t):  # int_0^t beta
        t = _t(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def B_inv(self, b):  # root of the quadratic B(t) = b, in a form free of cancellation
        d = self.beta_max - self.beta_min
        return 2 * b / (self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * b))

    def beta(self, t):
        return self.beta_min + (self.beta_max - self.beta_min) * _t(t)

    def log_mean_coef(self, t):
        return -0.5 * self.B(t)


@SDES.register
class VP(_BetaLinear):
    """VP: mu = e^{-B/2}, sigma^2 = 1 - e^{-B}, g^2 = beta; A = log(e^B - 1)."""

    name: Literal["vp"] = "vp"
    variance_preserving: ClassVar[bool] = True
    stabilizer: ClassVar[float] = 1e-3  # c of the official UDDPM++ time input

    def var(self, t):
        return -torch.expm1(-self.B(t))

    def g2(self, t):
        return self.beta(t)

    def antiderivative(self, t):
        b = self.B(t)
        return b + torch.log(-torch.expm1(-b))

    def antiderivative_inv(self, a):
        return self.B_inv(F.softplus(a))

    def embedding_antiderivative(self, t):
        b = self.B(t)
        return torch.log(-torch.expm1(-b) + self.stabilizer) + b


@SDES.register
class SubVP(_BetaLinear):
    """sub-VP: mu = e^{-B/2}, sigma = 1 - e^{-B}, g^2 = beta (1 - e^{-2B}); A = 2 log(2 sinh(B/2))."""

    name: Literal["subvp"] = "subvp"

    def var(self, t):
        return torch.expm1(-self.B(t)) ** 2

    def g2(self, t):
        return self.beta(t) * -torch.expm1(-2 * self.B(t))

    def antiderivative(self, t):
        return 2 * torch.log(2 * torch.sinh(self.B(t) / 2))

    def antiderivative_inv(self, a):
        return self.B_inv(2 * torch.asinh(torch.exp(a / 2) / 2))
