"""Score networks: registry entries build backbones eps(x, eta); ScoreModel adds eta(t) and sigma(t).

Nets predict noise, s_theta(x, t) = -net(x, eta(t)) / sigma(t) (the paper's noise parametrisation).
"""

from __future__ import annotations

import torch
from torch import nn

from stcli.components.nets import (
    ncsnpp,  # noqa: F401  (registers ncsnpp, ddpmpp)
    small,  # noqa: F401  (registers unet, mlp)
)
from stcli.components.sdes import LinearSDE, bcast


def c_skip(s: torch.Tensor, sd: float) -> torch.Tensor:
    """EDM's skip scaling c_skip = sd^2 / (s^2 + sd^2) (Karras et al. 2022, Table 1)."""
    return sd**2 / (s * s + sd**2)


def c_out(s: torch.Tensor, sd: float) -> torch.Tensor:
    """EDM's output scaling c_out = s sd / sqrt(s^2 + sd^2) (Karras et al. 2022, Table 1)."""
    return s * sd * c_in(s, sd)


def c_in(s: torch.Tensor, sd: float) -> torch.Tensor:
    """EDM's input scaling c_in = 1 / sqrt(s^2 + sd^2) (Karras et al. 2022, Table 1): unit
    variance into the backbone for data of standard deviation sd."""
    return torch.rsqrt(s * s + sd**2)


def noise_skip(s: torch.Tensor, sd: float) -> torch.Tensor:
    """(1 - c_skip) / s = s c_in^2, the coefficient of x~ in eps = (x~ - D)/s, written without
    the cancellation of 1 - c_skip as s -> 0."""
    norm = c_in(s, sd)
    return s * norm * norm


def noise_out(s: torch.Tensor, sd: float) -> torch.Tensor:
    """c_out / s = sd c_in, the coefficient of F in eps = (x~ - D)/s (finite as s -> 0)."""
    return sd * c_in(s, sd)


def time_precision(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t in float64 on x's device (float32 where the device has no float64, e.g. MPS): the time
    input and its embedding are computed from it, so a Fourier phase 2 pi W log sigma of
    thousands of radians keeps its digits; the embedding is cast to the weights' type."""
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    return torch.as_tensor(t, device=x.device).to(dtype)


class ScoreModel(nn.Module):
    """A backbone with its SDE: forward(x, t) is the noise prediction, score(x, t) the score.

    preconditioning "edm" (Karras et al. 2022, Table 1) wraps the backbone F in the scaled
    variables x~ = x/mu, s = sigma/mu: D(x~) = c_skip x~ + c_out F(c_in x~, c_noise) with
    `c_skip`, `c_out`, `c_in` below and c_noise the recipe's time input eta(t), and predicts the
    noise eps = (x~ - D)/s.  F = 0 is then the exact denoiser of N(0, sd^2 I).
    Without preconditioning, uncentred data (in [0, 1]) enter the backbone as 2x - 1.
    """

    def __init__(self, backbone: nn.Module, sde: LinearSDE, time_input: str,
                 preconditioning: str = "none", sigma_data: float = 0.5, centered: bool = True):
        super().__init__()
        self.backbone, self.sde, self.time_input = backbone, sde, time_input
        self.preconditioning, self.sigma_data, self.centered = preconditioning, sigma_data, centered

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eta = self.sde.time_input(time_precision(t, x), self.time_input)
        if self.preconditioning == "none":
            # data in [0, 1] (data.centered false) enter the net as 2x - 1 (score_sde's convention)
            return self.backbone(x if self.centered else 2 * x - 1, eta)
        mu = bcast(self.sde.mean_coef(t), x)
        s, sd = bcast(self.sde.std(t), x) / mu, self.sigma_data
        xs, norm = x / mu, c_in(s, sd)
        out = self.backbone(xs * norm, eta)
        return xs * noise_skip(s, sd) - noise_out(s, sd) * out  # (x~ - D)/s

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self(x, t) / bcast(self.sde.std(t), x)


def build_score_model(net_spec, sde: LinearSDE, shape: tuple[int, ...],
                      centered: bool = True) -> ScoreModel:
    """The recipe's score model; ``centered`` is the data's (false: data in [0, 1])."""
    return ScoreModel(net_spec.create(shape=shape), sde, net_spec.time_input,
                      net_spec.preconditioning, net_spec.sigma_data, centered)
