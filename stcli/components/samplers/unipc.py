"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) of the
probability flow in data prediction, for every linear SDE.  The corrector uses the evaluation
at the new point that the next step needs anyway, so it costs no evaluation: NFE = steps.

Variables as in `stcli.components.samplers.dpm`: x~ = x/mu, lambda = -log sigma~ = -A(t)/2 and the
denoiser D(x, t) = (x + sigma^2 s)/mu.  The flow is dx~/dlambda = D - x~, so over a step from
lambda_s to lambda_t = lambda_s + h (variation of constants, then Taylor's series of D):

    x~_t = e^{-h} x~_s + sum_{k>=0} h^{k+1} phi_{k+1}(-h) D^(k)(lambda_s),                 (1)

phi_j(z) = int_0^1 e^{(1-u) z} u^{j-1}/(j-1)! du (h phi_1(-h) = 1 - e^{-h}).  Earlier (or
later) evaluations D_m at lambda_s + r_m h give the differences
(D_m - D_s)/r_m = sum_{k>=1} r_m^{k-1} h^k/k! D^(k)(lambda_s), and the update

    x~_t = e^{-h} x~_s + (1 - e^{-h}) D_s + B(h) sum_m rho_m (D_m - D_s)/r_m                (2)

matches (1) through D^(K) (K differences) when the rho_m solve the Vandermonde system

    sum_m rho_m r_m^{k-1} = k! h phi_{k+1}(-h) / B(h),  k = 1..K.                          (3)

UniP-p uses the p - 1 previous evaluations (r_m < 0): local error O(h^{p+1}), order p.
UniC-p adds the evaluation at the predicted x~_t (r = 1) to the same system: order p + 1.
A one-difference system only needs its right side to O(h): UniPC takes its limit
rho = 1/2, and then B(h) = h or 1 - e^{-h} (`bh`: "h" or "expm1") sets the h^2 term of the
step; larger systems are solved exactly, where B(h) cancels.  The step's order is lowered
where the history is short (the first steps) and, with `lower_order_final`, where few steps
remain; the last step has no corrector (there is no evaluation at eps to reuse).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, PositiveInt, ValidationInfo, field_validator

from stcli.components.samplers.base import GridSampler, Schedule, ScoreFn
from stcli.components.samplers.dpm import denoiser
from stcli.components.sdes import LinearSDE
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS

BH = Literal["h", "expm1"]


def phi_minus(j: int, h: float) -> float:
    """phi_j(-h), j >= 1: the series sum_n (-h)^n/(n+j)! for h < 1, else the recurrence
    phi_1(-h) = (1 - e^{-h})/h, phi_{j+1}(-h) = (1/j! - phi_j(-h))/h."""
    if h < 1:
        return sum((-h) ** n / math.factorial(n + j) for n in range(30))
    value = -math.expm1(-h) / h
    for i in range(1, j):
        value = (1 / math.factorial(i) - value) / h
    return value


def b_of_h(h: float, bh: BH) -> float:
    """B(h): h, or 1 - e^{-h} (the weight of D_s in Eq. (2))."""
    return h if bh == "h" else -math.expm1(-h)


def weights(r: list[float], h: float, bh: BH) -> list[float]:
    """B(h) rho_m of Eq. (2) for the differences at ratios r: rho from Eq. (3), or 1/2 for one
    difference."""
    if len(r) == 1:
        return [b_of_h(h, bh) / 2]
    rows = torch.tensor([[rm ** (k - 1) for rm in r] for k in range(1, len(r) + 1)], dtype=torch.float64)
    rhs = torch.tensor([math.factorial(k) * h * phi_minus(k + 1, h) for k in range(1, len(r) + 1)],
                       dtype=torch.float64)
    return torch.linalg.solve(rows, rhs).tolist()  # B(h) rho: B(h) cancels


def step_order(order: int, i: int, steps: int, lower_order_final: bool) -> int:
    """The order of step i (1-based): at most i (i evaluations so far) and, with
    `lower_order_final`, at most steps - i + 1 (the steps left, this one included)."""
    return min(order, i, steps - i + 1) if lower_order_final else min(order, i)


def uni_pc(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, ts: list[float], order: int,
           bh: BH = "h", corrector: bool = True, lower_order_final: bool = True):
    """x at ts[-1] from x at ts[0] by UniP-order (+ UniC); returns (x, nfe)."""
    tt = torch.tensor(ts, dtype=torch.float64)
    mu = sde.mean_coef(tt).tolist()
    lam = (-sde.antiderivative(tt) / 2).tolist()  # lambda = -log sigma~
    steps = len(ts) - 1
    xs = x / mu[0]
    history = [(lam[0], denoiser(score_fn, sde, x, ts[0]))]  # (lambda, D), newest last
    for i in range(1, steps + 1):
        p, h = step_order(order, i, steps, lower_order_final), lam[i] - lam[i - 1]
        lam_s, d_s = history[-1]
        r = [(lam_m - lam_s) / h for lam_m, _ in history[-p:-1]]
        diffs = [(d_m - d_s) / r_m for (_, d_m), r_m in zip(history[-p:-1], r)]
        base = math.exp(-h) * xs - math.expm1(-h) * d_s  # Eq. (2) without differences
        xs = base + sum(w * dm for w, dm in zip(weights(r, h, bh), diffs)) if diffs else base
        if i == steps:
            break
        d_t = denoiser(score_fn, sde, mu[i] * xs, ts[i])
        if corrector:  # UniC: the same step with D_t at r = 1 added
            w = weights(r + [1.0], h, bh)
            xs = base + sum(wm * dm for wm, dm in zip(w, diffs + [d_t - d_s]))
        history = (history + [(lam[i], d_t)])[-order:]
    return mu[-1] * xs, steps


def unreached(order: int, steps: int, final: bool) -> str | None:
    """Why unipc cannot run `order` in `steps` steps, or None."""
    top = max(step_order(3, i, steps, final) for i in range(1, steps + 1))
    if top >= order:
        return None
    need = 2 * order - 1 if final else order
    return (f"unipc never reaches order {order} in {steps} steps (lowered at the first"
            f"{' and last' if final else ''} steps): it needs at least {need} steps; {steps} steps "
            f"reach order {top} (order: {top})")


@SAMPLERS.register
class UniPC(GridSampler):
    """UniPC on the probability flow (Zhao et al. 2023): predictor of order `order`, corrector
    of order `order` + 1 at no extra evaluation; NFE = steps (+1 with denoise)."""

    name: Literal["unipc"] = "unipc"
    steps: PositiveInt = 10
    schedule: Schedule = "edm"
    bh: BH = "h"
    corrector: bool = True
    lower_order_final: bool = True
    order: int = Field(3, ge=1, le=3)  # the default is checked by `check`, before sampling

    @field_validator("order")
    @classmethod
    def _reached(cls, order: int, info: ValidationInfo) -> int:
        steps, final = info.data.get("steps"), info.data.get("lower_order_final")
        if steps is not None and final is not None:
            problem = unreached(order, steps, final)
            if problem:
                raise ValueError(problem)
        return order

    def check(self, sde) -> None:
        super().check(sde)
        problem = unreached(self.order, self.steps, self.lower_order_final)  # the default too
        if problem:
            raise UserError(f"sampler.order: {problem}")

    def integrate(self, score_fn, sde, x, generator):
        return uni_pc(score_fn, sde, x, self.time_grid(sde), self.order, self.bh, self.corrector,
                      self.lower_order_final)
