"""What every sampler shares: the call signature, noise draws, time grids and the final Tweedie
denoising step.

Every sampler is called as ``sampler(score_fn, sde, x_T, generator=None) -> (x, nfe)``:
``score_fn(x, t)`` is the score with ``t`` a float64 tensor of shape (B,), ``x_T`` the prior
draw, and ``nfe`` the number of evaluations of ``score_fn`` on the batch.  ``generator`` is a
``torch.Generator`` or one generator per sample: then row i of every noise draw comes from
generator i alone, so a sample does not depend on the batch it is drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import PositiveFloat, PositiveInt, field_validator, model_serializer, model_validator

from stcli.components.sdes import LinearSDE, ScoreFn, bcast
from stcli.infra.errors import UserError
from stcli.infra.registry import Component

Generators = torch.Generator | Sequence[torch.Generator] | None
Schedule = Literal["uniform", "log_snr", "edm"]


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """N(0, I) noise shaped like x, drawn row by row when given one generator per sample."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype)
                        for g in generator])


class Sampler(Component):
    """Integrates from T down to the SDE's eps; `denoise` adds a Tweedie step at eps."""

    denoise: bool = True

    @torch.no_grad()
    def __call__(self, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor,
                 generator: Generators = None) -> tuple[torch.Tensor, int]:
        x, nfe = self.integrate(score_fn, sde, x, generator)
        if self.denoise:
            return tweedie(score_fn, sde, x, sde.eps), nfe + 1
        return x, nfe

    def check(self, sde: LinearSDE) -> None:
        """Refuse (UserError) settings this SDE cannot run; called before sampling starts."""
        self.check_stored(sde)

    def check_stored(self, sde: LinearSDE) -> None:
        """What a recipe's sampler must satisfy to be valid at all (checked on every recipe,
        those stored in checkpoints too, so it never grows: a stricter rule goes in `check`)."""

    def ignored(self) -> dict[str, str]:
        """Settings that have no effect given the others (name -> why): given as options,
        they are refused rather than recorded as if they mattered."""
        return {}

    def integrate(self, score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor,
                  generator: Generators) -> tuple[torch.Tensor, int]:
        """x at time eps from x at time T, and the number of score evaluations."""
        raise NotImplementedError


MAX_STEPS = 1_000_000  # a grid's length: beyond any published sampler, far below memory
LINE_FROM = 8  # GridSampler.nfe: counted on grids of 8, 9, 10 steps (every order reached)


class GridSampler(Sampler):
    """A sampler on a fixed grid of `steps` + 1 times from T to eps: the `schedule` (with
    `rho`), or the explicit decreasing `times` (T first, eps last; e.g. a grid tuned for one
    model by `st tune-steps`), which then also set `steps`."""

    steps: PositiveInt = 1000
    schedule: Schedule = "uniform"
    rho: PositiveFloat = 7.0
    times: list[float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _steps_of_times(cls, data: Any) -> Any:
        """Explicit times give the step count: `steps`, if also given, must agree."""
        if not isinstance(data, dict) or data.get("times") is None:
            return data
        times = data["times"]
        if not isinstance(times, list) or len(times) < 2:
            raise ValueError("times must be a list of at least two times (T first, eps last)")
        steps = data.get("steps", len(times) - 1)
        if not isinstance(steps, int) or isinstance(steps, bool):
            return data  # not a whole number: the field's own check says so
        if steps != len(times) - 1:
            raise ValueError(f"times holds {len(times)} times, i.e. {len(times) - 1} steps, but "
                             f"steps is {steps}; give one of them")
        return {**data, "steps": len(times) - 1}

    @field_validator("steps")
    @classmethod
    def _grid_fits(cls, steps: int) -> int:
        """The grid is held in memory (8 bytes a time): 10^9 steps would exhaust it."""
        if steps > MAX_STEPS:
            raise ValueError(f"{steps:,} steps: a grid sampler takes at most {MAX_STEPS:,} "
                             "(score_sde's finest grid has 2,000)")
        return steps

    @field_validator("times")
    @classmethod
    def _decreasing(cls, times: list[float] | None) -> list[float] | None:
        if times is not None and not all(math.isfinite(t) and t > 0 for t in times):
            raise ValueError("times must be finite and positive")
        if times is not None and any(b >= a for a, b in zip(times, times[1:])):
            raise ValueError("times must decrease strictly, from T to eps")
        return times

    @model_serializer(mode="wrap")
    def _no_unset_times(self, handler):
        """Without explicit times the dump has no `times` key: recipes, checkpoints and sample
        manifests written before the field existed stay equal to today's."""
        data = handler(self)
        if data.get("times") is None:
            data.pop("times", None)
        return data

    def check(self, sde: LinearSDE) -> None:
        super().check(sde)
        if self.times is None:
            self._check_grid(sde)

    def check_stored(self, sde: LinearSDE) -> None:
        if self.times is None:
            return
        for what, want, got in (("first", sde.T, self.times[0]), ("last", sde.eps, self.times[-1])):
            if not math.isclose(got, want, rel_tol=1e-9, abs_tol=0.0):
                raise UserError(f"the sampler's times must run from the SDE's T = {sde.T} to its "
                                f"eps = {sde.eps}: the {what} time is {got}")

    def ignored(self) -> dict[str, str]:
        return {"rho": f"schedule {self.schedule} has no rho (edm's)"} \
            if self.schedule != "edm" and self.times is None else {}

    def _check_grid(self, sde: LinearSDE) -> None:
        """The schedule's grid: strictly decreasing (a huge rho collapses it), and not uniform
        in t for the RVE, whose sigma ~ exp(-c/t) then falls by orders of magnitude within the
        last step at any step count (its samples are noise)."""
        ts = time_grid(sde, self.steps, self.schedule, self.rho)
        if not all(math.isfinite(t) for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
            raise UserError(f"the {self.schedule} grid of {self.steps} steps (rho {self.rho:g}) "
                            "does not decrease strictly from T to eps: some times coincide; use a "
                            "smaller rho or fewer steps")
        if sde.name == "rve" and self.schedule == "uniform":
            sigma = sde.std(torch.tensor(ts[-2:], dtype=torch.float64)).tolist()
            raise UserError(f"a grid uniform in t cannot sample the RVE SDE: its sigma falls from "
                            f"{sigma[0]:.3g} to {sigma[1]:.3g} in the last of the {self.steps} "
                            "steps; use schedule log_snr (uniform in 1/t) or edm")

    def nfe(self, sde: LinearSDE) -> int:
        """Score evaluations per image, counted by running the sampler on one number under the
        score of N(0, 1): the grid itself up to LINE_FROM + 2 steps; beyond, from runs of
        LINE_FROM and LINE_FROM + 1 steps, since every grid sampler costs a + b * steps (a run of
        LINE_FROM + 2 checks the line), so a long grid is counted at once."""
        def count(steps: int) -> int:
            spec = self if steps == self.steps else self.model_copy(update={"steps": steps,
                                                                            "times": None})
            return spec(lambda x, t: -x, sde, torch.zeros(1, 1),
                        generator=torch.Generator().manual_seed(0))[1]

        if self.steps <= LINE_FROM + 2:
            return count(self.steps)
        a, b, c = (count(LINE_FROM + k) for k in range(3))
        if c - b != b - a:
            raise RuntimeError(f"{self.name}: NFE {a}, {b}, {c} at {LINE_FROM}, {LINE_FROM + 1}, "
                               f"{LINE_FROM + 2} steps is not linear in the steps")
        return a + (b - a) * (self.steps - LINE_FROM)

    def time_grid(self, sde: LinearSDE) -> list[float]:
        if self.times is not None:
            self.check_stored(sde)
            return [sde.T, *self.times[1:-1], sde.eps]
        return time_grid(sde, self.steps, self.schedule, self.rho)


def grid_times(sde: LinearSDE, u: torch.Tensor, schedule: Schedule = "uniform",
               rho: float = 7.0) -> torch.Tensor:
    """The times at fractions u in [0, 1] (float64) of a schedule's way from T (u = 0) to eps
    (u = 1).

    uniform: linear in t (Song et al. 2021).  log_snr: linear in A(t) = log(sigma^2/mu^2),
    i.e. the quantiles of the importance density p_iw ∝ g^2/sigma^2 (Sec. 4.1); linear in t
    for VE, in 1/t for RVE.  edm: Karras et al. 2022 Eq. (5) in the scaled noise level
    s = sigma/mu = exp(A/2): s = (s_T^(1/rho) + u (s_eps^(1/rho) - s_T^(1/rho)))^rho, dense
    where the probability-flow trajectories curve (small s).
    """
    if schedule == "uniform":
        return (sde.T + u * (sde.eps - sde.T)).clamp(sde.eps, sde.T)
    a_hi, a_lo = (sde.antiderivative(torch.tensor(t, dtype=torch.float64)) for t in (sde.T, sde.eps))
    if schedule == "log_snr":
        a = a_hi + u * (a_lo - a_hi)
    else:
        s_hi, s_lo = torch.exp(a_hi / 2) ** (1 / rho), torch.exp(a_lo / 2) ** (1 / rho)
        a = 2 * rho * torch.log(s_hi + u * (s_lo - s_hi))
    return sde.antiderivative_inv(a).clamp(sde.eps, sde.T)


def time_grid(sde: LinearSDE, steps: int, schedule: Schedule = "uniform",
              rho: float = 7.0) -> list[float]:
    """steps + 1 decreasing times from T to eps, equally spaced in the schedule's variable
    (`grid_times` at u = i/steps)."""
    ts = grid_times(sde, torch.arange(steps + 1, dtype=torch.float64) / steps, schedule, rho)
    ts[0], ts[-1] = sde.T, sde.eps  # exact end points
    return ts.tolist()


def times(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time t for every sample of x, as a float64 (B,) tensor."""
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)


def tweedie(score_fn: ScoreFn, sde: LinearSDE, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x0 | x_t] = (x_t + sigma^2 s(x_t, t)) / mu (Tweedie's formula; Efron 2011)."""
    tt = times(t, x)
    return (x + bcast(sde.var(tt), x) * score_fn(x, tt)) / bcast(sde.mean_coef(tt), x)
