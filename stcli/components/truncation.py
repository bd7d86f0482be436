"""Distributions P(tau) of the truncation time tau on [eps, T] (Sec. 4.2, 4.5).

Soft Truncation draws one tau ~ P per optimisation step; in expectation the loss equals the
lambda = g^2_P weighting with g^2_P(t) = F_P(t) g^2(t), F_P the CDF of P (Eq. 10).
"""

from __future__ import annotations

import math
from typing import Annotated, ClassVar, Literal, Union

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, model_validator

from stcli.infra.registry import TRUNCATIONS, Component


def _uniform(generator: torch.Generator | None) -> float:
    return torch.rand((), generator=generator, dtype=torch.float64).item()


class Truncation(Component):
    T: ClassVar[float] = 1.0
    eps: PositiveFloat = 1e-5

    @model_validator(mode="after")
    def _eps_below_T(self):
        if not self.eps < self.T:
            raise ValueError(f"eps ({self.eps}) must be below T = {self.T}")
        return self

    def sample(self, generator: torch.Generator | None = None) -> float:
        raise NotImplementedError

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """F_P(t) = P(tau <= t)."""
        raise NotImplementedError


@TRUNCATIONS.register
class Hard(Truncation):
    """tau = eps always: the ordinary truncated diffusion loss (P_k with k = infinity)."""

    name: Literal["hard"] = "hard"

    def sample(self, generator=None) -> float:
        return self.eps

    def cdf(self, t):
        return (torch.as_tensor(t) >= self.eps).to(torch.as_tensor(t).dtype)


@TRUNCATIONS.register
class Power(Truncation):
    """P_k(tau) ∝ tau^{-k} on [eps, T] (Eq. 11), drawn by its inverse CDF.

    With c = 1 - k and L(t) = log(t / eps), F(t) = expm1(c L(t)) / expm1(c L(T)) (log F(t) =
    L(t) / L(T) for k = 1): every power is taken in log space, so a large k (P_k tends to
    the point mass at eps, the hard truncation) neither overflows nor loses precision.
    k must be finite; use `name: hard` for k = infinity.
    """

    name: Literal["power"] = "power"
    k: NonNegativeFloat = 1.0

    def sample(self, generator=None) -> float:
        u, span = _uniform(generator), math.log(self.T / self.eps)
        c = 1.0 - self.k
        if c == 0.0:
            return self.eps * math.exp(u * span)
        log_ratio = math.log1p(u * math.expm1(c * span)) / c  # L(tau), from F(tau) = u
        return min(self.T, max(self.eps, self.eps * math.exp(log_ratio)))

    def cdf(self, t):
        t = torch.as_tensor(t)
        ratio = torch.log(t.clamp(self.eps, self.T) / self.eps)
        span, c = math.log(self.T / self.eps), 1.0 - self.k
        if c == 0.0:
            return ratio / span
        return torch.expm1(c * ratio) / math.expm1(c * span)


Single = Annotated[Union[Hard, Power], Field(discriminator="name")]  # noqa: UP007


@TRUNCATIONS.register
class Mixture(Truncation):
    """sum_i w_i P_i, e.g. 1/2 delta_eps + 1/2 P_0.9 (Table 15). Components share eps."""

    name: Literal["mixture"] = "mixture"
    components: list[Single] = Field(min_length=1)
    weights: list[PositiveFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.weights) != len(self.components):
            raise ValueError("weights and components must have the same length")
        for i, c in enumerate(self.components):
            if "eps" in c.model_fields_set and c.eps != self.eps:
                raise ValueError(f"components[{i}].eps ({c.eps}) differs from the mixture's eps")
        shared = [c.model_copy(update={"eps": self.eps}) for c in self.components]
        object.__setattr__(self, "components", shared)
        return self

    @property
    def probs(self) -> list[float]:
        total = sum(self.weights)
        return [w / total for w in self.weights]

    def sample(self, generator=None) -> float:
        u, acc = _uniform(generator), 0.0
        for p, c in zip(self.probs, self.components):
            acc += p
            if u < acc:
                return c.sample(generator)
        return self.components[-1].sample(generator)

    def cdf(self, t):
        return sum(p * c.cdf(t) for p, c in zip(self.probs, self.components))
