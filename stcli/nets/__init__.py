"""Score networks: registry entries build backbones eps(x, eta); ScoreModel adds eta(t) and sigma(t).

Nets predict noise, s_theta(x, t) = -net(x, eta(t)) / sigma(t) (DESIGN §3).
"""

from __future__ import annotations

import torch
from torch import nn

from stcli.nets import small  # noqa: F401  (registers unet, mlp)
from stcli.nets import ncsnpp  # noqa: F401  (registers ncsnpp, ddpmpp)
from stcli.sdes import LinearSDE, _bcast


class ScoreModel(nn.Module):
    """A backbone with its SDE: forward(x, t) is the noise prediction, score(x, t) the score."""

    def __init__(self, backbone: nn.Module, sde: LinearSDE, time_input: str):
        super().__init__()
        self.backbone, self.sde, self.time_input = backbone, sde, time_input

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eta = self.sde.time_input(t, self.time_input).to(x.dtype)
        return self.backbone(x, eta)

    def score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -self(x, t) / _bcast(self.sde.std(t), x)


def build_score_model(net_spec, sde: LinearSDE, shape: tuple[int, ...]) -> ScoreModel:
    return ScoreModel(net_spec.create(shape=shape), sde, net_spec.time_input)
