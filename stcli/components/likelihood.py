"""Likelihood by the probability-flow ODE, before and after correction, and the NELBO.

The probability flow dx/dt = F(x, t) = f(x, t) - 1/2 g^2(t) s(x, t) carries p_eps to p_T, and
d log p_t(x_t)/dt = -div F (instantaneous change of variables), so

    log p_eps(x_eps) = log pi(x_T) + int_eps^T div F(x_t, t) dt.

`correction="before"` starts the flow at the data x0 (-log p_eps(x0), Song et al. 2021);
`"after"` starts at x_eps = mu(eps) x0 + sigma(eps) z and adds the reconstruction term R_eps of
the Tweedie decoder: -log p_eps(x_eps) + R_eps, an upper bound of -log p_0(x0) (Eq. 7).
The NELBO is the denoising bound L(theta; g^2, eps) of Lemma 1 (Eq. 17), with or without R_eps.

The flow can be integrated in three variables (`time_variable`):

- ``t``: the state x in diffusion time (Song et al. 2021; the paper's protocol);
- ``lambda``: x in the half log-SNR lambda = log(sigma/mu) = A(t)/2, dt/dlambda = 2 sigma^2/g^2;
- ``lambda_scaled``: the scaled state x~ = x/mu in lambda (Karras et al. 2022's variables),
  dx~/dlambda = -(sigma^2/mu) s(mu x~, t) = sigma~ eps_hat, whose solution is close to linear in
  sigma~ = e^lambda; its divergence is -sigma^2 div s, and the densities of x and x~ differ by
  the constant d log mu, so log p_eps(x_eps) = log pi(x_T) + d log(mu_T/mu_eps)
  + int div_x~ dlambda (the d log(mu_T/mu_eps) = -d/2 int beta dt being the divergence of f).
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from stcli.components.sdes import LinearSDE, ScoreFn, bcast, flow_drift, sum_squares
from stcli.infra.solvers import dopri5

TIME_VARIABLES = ("t", "lambda", "lambda_scaled")
ERROR_NORMS = ("rms", "rms_per_part")
# The paper's protocol (scipy RK45 conventions, rtol = atol = 1e-5 in t).  It is also the default
# (a recipe's eval.nll section may choose another): the cheaper settings measured by
# benchmarks/nll.py (docs/performance.md) do not hold |dNLL| <= 0.005 bits/dim on every model —
# nets with the t999 time input oscillate in t faster than loose steps, whose error estimates
# then miss the true error (benchmarks/nll_local_error.py).
PAPER = {"time_variable": "t", "rtol": 1e-5, "atol": 1e-5, "error_norm": "rms"}
DEFAULT = dict(PAPER)
# `st nll --protocol fast`: 5-10x fewer NFE than the paper's protocol; the mean over 256 test
# points within 0.0017-0.0051 bits/dim of a tight solve on the models measured (0.0051 on a
# CIFAR-shaped t999 net, whose aliasing a tighter tolerance does not remove; benchmarks/nll_fast.py
# -> benchmarks/results/nll_fast.json); single points may err more.
FAST = {"time_variable": "t", "rtol": 1e-3, "atol": 1e-3, "error_norm": "rms"}
PROTOCOLS = {"paper": PAPER, "fast": FAST}


class NonFiniteError(ArithmeticError):
    """The probability flow produced NaN/inf for some samples (batch indices) at time t."""

    def __init__(self, samples: list[int], t: float):
        super().__init__(f"non-finite values for samples {samples} at t = {t:.6g}")
        self.samples, self.t = samples, t


def bits_per_dim(nll_nats: torch.Tensor, dim: int, offset: float) -> torch.Tensor:
    """nats per sample -> bits/dim of 8-bit data: offset 8 for [0, 1] scaling, 7 for [-1, 1]."""
    return nll_nats / (dim * math.log(2)) + offset


def draw_probes(shape, kind: str, k: int, generator, device, dtype) -> torch.Tensor:
    """k Hutchinson probes of `shape`: Rademacher (+-1) or standard Gaussian."""
    v = torch.randn((k, *shape), generator=generator, device=device, dtype=dtype)
    return v.sign() if kind == "rademacher" else v


def value_and_divergence(fn, x: torch.Tensor, kind: str, vs: torch.Tensor | None):
    """(F(x), div F(x)) per sample: exactly (one backward pass per dimension) or by Hutchinson,
    div F ~ mean_k v_k^T (dF/dx) v_k."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = fn(x)
        if kind == "exact":
            flat = out.flatten(1)
            cols = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0].flatten(1)[:, i]
                    for i in range(flat.shape[1])]
            return out.detach(), torch.stack(cols, 1).sum(1)
        div = 0
        for i, v in enumerate(vs):
            (jv,) = torch.autograd.grad(out, x, v, retain_graph=i < len(vs) - 1)
            div = div + (jv * v).flatten(1).sum(1)
    return out.detach(), div / len(vs)


def reconstruction(score_fn: ScoreFn, sde: LinearSDE, x0, z, eps: float) -> torch.Tensor:
    """R_eps per sample (Eq. 7) for a score model: the noise prediction is -sigma s."""
    return reconstruction_from_noise(lambda x, t: -bcast(sde.std(t), x) * score_fn(x, t),
                                     sde, x0, z, eps)


def reconstruction_from_noise(noise_fn, sde: LinearSDE, x0, z, eps: float) -> torch.Tensor:
    """R_eps = E[log p_0eps(x_eps|x0) - log q(x0|x_eps)] per sample (Eq. 7) with the Tweedie
    decoder q(x0|x) = N((x + sigma^2 s)/mu, (sigma/mu)^2 I) and eps_hat = noise_fn(x, t) = -sigma s:
    R = -d log mu(eps) + 1/2 (||eps_hat - z||^2 - ||z||^2) at x_eps = mu x0 + sigma z."""
    t = torch.full((x0.shape[0],), eps, device=x0.device, dtype=x0.dtype)
    x = sde.marginal(x0, t, z)
    rec = 0.5 * (sum_squares(noise_fn(x, t) - z) - sum_squares(z))
    return rec - x0[0].numel() * sde.log_mean_coef(t).to(rec.dtype)


class Flow:
    """The likelihood ODE in `variable`: u0, u1 (the integration interval), the state at u0 from
    x at eps, the field (value, divergence) at u, and x_T with the constant log-density term."""

    def __init__(self, score_fn: ScoreFn, sde: LinearSDE, eps: float, variable: str):
        if variable not in TIME_VARIABLES:
            raise ValueError(f"time variable must be one of {TIME_VARIABLES}, not {variable!r}")
        self.score_fn, self.sde, self.eps, self.variable = score_fn, sde, eps, variable
        ends = torch.tensor([eps, sde.T], dtype=torch.float64)
        self.u0, self.u1 = (ends if variable == "t" else sde.antiderivative(ends) / 2).tolist()
        self.log_mu = sde.log_mean_coef(ends).tolist()

    def time(self, u: float) -> float:
        if self.variable == "t":
            return u
        t = self.sde.antiderivative_inv(torch.tensor(2 * u, dtype=torch.float64))
        return float(t.clamp(self.eps, self.sde.T))

    def start(self, x_eps: torch.Tensor) -> torch.Tensor:
        return x_eps / math.exp(self.log_mu[0]) if self.variable == "lambda_scaled" else x_eps

    def field(self, u: float, tt: torch.Tensor):
        """y -> dy/du at u; tt the time t(u) for every sample."""
        sde, score_fn, t = self.sde, self.score_fn, tt[:1].double()
        if self.variable == "t":
            return lambda y: flow_drift(score_fn, sde, y, tt)
        if self.variable == "lambda":
            dt_du = float(2 * sde.var(t) / sde.g2(t))  # dt/dlambda = 2 / (dA/dt)
            return lambda y: dt_du * flow_drift(score_fn, sde, y, tt)
        mu, var = float(sde.mean_coef(t)), float(sde.var(t))
        return lambda y: -(var / mu) * score_fn(mu * y, tt)

    def finish(self, y_T: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x_T, the log-density change not in the integral of the divergence)."""
        if self.variable != "lambda_scaled":
            return y_T, 0.0
        d = y_T[0].numel()
        return y_T * math.exp(self.log_mu[1]), d * (self.log_mu[1] - self.log_mu[0])


@torch.no_grad()
def nll(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, *, eps: float,
        correction: Literal["before", "after"] = "after",
        divergence: Literal["rademacher", "gaussian", "exact"] = "rademacher",
        probes: int = 1, rtol: float = DEFAULT["rtol"], atol: float = DEFAULT["atol"],
        time_variable: str = DEFAULT["time_variable"], error_norm: str = DEFAULT["error_norm"],
        logp_tol: float | None = None,
        generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """Per-sample negative log-likelihood in nats and the number of function evaluations.

    error_norm "rms" (scipy's) weighs the log-density as one of the d + 1 elements of the state;
    "rms_per_part" integrates it in nats per dimension, the unit of bits/dim, and holds it to the
    tolerances on its own (`stcli.infra.solvers.rms_norm`), whatever the dimension d."""
    kind, x0 = divergence, x
    flow = Flow(score_fn, sde, eps, time_variable)
    if correction == "after":
        z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        start = sde.marginal(x0, torch.full((x0.shape[0],), eps, device=x0.device,
                                            dtype=x0.dtype), z)
    else:
        start = x0
    vs = None if kind == "exact" else draw_probes(x0.shape, kind, probes, generator, x0.device,
                                                  x0.dtype)

    def rhs(u, state):
        y, _ = state
        t = flow.time(float(u))
        tt = torch.full((y.shape[0],), t, device=y.device, dtype=y.dtype)
        drift, div = value_and_divergence(flow.field(float(u), tt), y, kind, vs)
        bad = ~torch.isfinite(torch.cat([drift.flatten(1), div[:, None]], 1)).all(1)
        if bad.any():
            raise NonFiniteError(bad.nonzero().flatten().tolist(), t)
        return drift, div

    delta0 = torch.zeros(x0.shape[0], device=x0.device, dtype=x0.dtype)
    per_dim = x0[0].numel() if error_norm == "rms_per_part" else 1  # log p in nats per dimension

    def scaled_rhs(u, state):
        drift, div = rhs(u, state)
        return drift, div / per_dim

    if logp_tol is not None:  # the log-density's own absolute tolerance, in nats (from bits/dim)
        rtol, atol = (rtol, 0.0), (atol, logp_tol * x0[0].numel() * math.log(2))
    (y_T, delta), nfe = dopri5(scaled_rhs, (flow.start(start), delta0), flow.u0, flow.u1, rtol=rtol,
                               atol=atol, error_norm=error_norm)
    delta = delta * per_dim
    x_T, const = flow.finish(y_T)
    out = -(sde.prior_logp(x_T) + delta + const)
    if correction == "after":
        out = out + reconstruction(score_fn, sde, x0, z, eps)
        nfe += 1
    return out, nfe


@torch.no_grad()
def nelbo(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, *, eps: float, samples: int = 1,
          residual: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """L(theta; g^2, eps) per sample (Eq. 17) by importance-sampled Monte Carlo over t (Eq. 9),
    `samples` draws of (t, z) per datum; with `residual`, plus R_eps.

        1/2 Z_eps E[||sigma s + z||^2 - ||z||^2] + d/2 int_eps^T beta dt - E[log pi(x_T) | x0]
    """
    n, d = x.shape[0], x[0].numel()
    total = torch.zeros(n, device=x.device, dtype=x.dtype)
    for _ in range(samples):
        t, big_z = sde.sample_time(n, eps, generator=generator, device=x.device, dtype=x.dtype)
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_t = sde.marginal(x, t, z)
        sigma_s = bcast(sde.std(t), x) * score_fn(x_t, t)
        total += 0.5 * big_z * (sum_squares(sigma_s + z) - sum_squares(z))
    out = total / samples + 0.5 * d * _int_beta(sde, eps) - expected_prior_logp(sde, x)
    if residual:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        out = out + reconstruction(score_fn, sde, x, z, eps)
    return out


def _int_beta(sde: LinearSDE, eps: float) -> float:
    """int_eps^T beta dt = -2 log(mu(T)/mu(eps)); the negative divergence of f, per dimension."""
    t = torch.tensor([eps, sde.T], dtype=torch.float64)
    lm = sde.log_mean_coef(t)
    return float(-2 * (lm[1] - lm[0]))


def expected_prior_logp(sde: LinearSDE, x0: torch.Tensor) -> torch.Tensor:
    """E[log pi(x_T) | x0] for x_T ~ N(mu_T x0, sigma_T^2 I) and pi = N(0, s^2 I), in closed form."""
    d, s2 = x0[0].numel(), sde.prior_std**2
    t = torch.tensor(sde.T, dtype=torch.float64)
    mu2, var = float(sde.mean_coef(t)) ** 2, float(sde.var(t))
    sq = x0.flatten(1).pow(2).sum(1)
    return -0.5 * d * math.log(2 * math.pi * s2) - (mu2 * sq + d * var) / (2 * s2)
