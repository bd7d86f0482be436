"""The loss against independent references: Eq. (10) by Monte Carlo, and R_eps by densities."""

import math

import pytest
import torch

from stcli.components.losses import ScoreMatchingLoss
from stcli.infra.registry import SDES, TRUNCATIONS


class FixedNet(torch.nn.Module):
    """A fixed, smooth noise predictor eps(x, t) for 2-D data (no training)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(3, 32, generator=g, dtype=torch.float64) / 2
        self.w2 = torch.randn(32, 2, generator=g, dtype=torch.float64) / 6

    def forward(self, x, t):
        h = torch.cat([x, torch.log(t)[:, None].to(x.dtype) / 5], 1)
        return torch.tanh(h @ self.w1) @ self.w2


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[1.0, 1.0], [-1.0, -0.5]], dtype=torch.float64)
    return centers[torch.randint(0, 2, (n,), generator=g)] + 0.1 * torch.randn(
        n, 2, generator=g, dtype=torch.float64)


def mc_mean(loss, sde, taus, batch, seed):
    """Mean and standard error of the per-call batch means, one tau per call."""
    net, g = FixedNet(), torch.Generator().manual_seed(seed)
    means = torch.stack([loss(net, sde, data(batch, seed + i), tau, generator=g).mean()
                         for i, tau in enumerate(taus)])
    return means.mean().item(), means.std().item() / math.sqrt(len(means))


def close(a, b, k=4.5):
    (m1, s1), (m2, s2) = a, b
    return abs(m1 - m2) < k * math.hypot(s1, s2)


@pytest.mark.parametrize("sde_name, k", [("vp", 1.0), ("vp", 0.9), ("rve", 2.0)])
def test_soft_truncation_equals_g2_P_weighting_eq10(sde_name, k):
    """E_{tau~P_k}[L(theta; g^2, tau)] = L(theta; g^2_P, eps) for a fixed network (Eq. 10)."""
    eps = 1e-3
    sde = SDES.build(sde_name, eps=eps)
    P = TRUNCATIONS.build("power", k=k, eps=eps)
    g = torch.Generator().manual_seed(123)
    taus = [P.sample(g) for _ in range(600)]
    st = mc_mean(ScoreMatchingLoss(), sde, taus, 32, seed=1)
    g2p = mc_mean(ScoreMatchingLoss(weighting="g2_P", weighting_P=P), sde, [eps] * 600, 32, seed=2)
    assert close(st, g2p), (st, g2p)
    # and a mismatched P is detected at this precision (the test can fail)
    other = ScoreMatchingLoss(weighting="g2_P", weighting_P=TRUNCATIONS.build("power", k=k + 1.5,
                                                                              eps=eps))
    assert not close(st, mc_mean(other, sde, [eps] * 600, 32, seed=3))


@pytest.mark.parametrize("weighting", ["likelihood", "variance", "g2_P"])
def test_importance_and_uniform_time_estimate_the_same_integral(weighting):
    eps = 1e-2
    sde = SDES.build("vp", eps=eps)
    extra = {"weighting_P": TRUNCATIONS.build("power", k=1.0, eps=eps)} if weighting == "g2_P" else {}
    a = mc_mean(ScoreMatchingLoss(weighting=weighting, **extra), sde, [eps] * 400, 64, seed=4)
    b = mc_mean(ScoreMatchingLoss(weighting=weighting, time_sampling="uniform", **extra), sde,
                [eps] * 400, 64, seed=5)
    assert close(a, b), (a, b)


def test_likelihood_weight_is_Z_and_variance_weight_is_T_minus_tau():
    sde = SDES.build("vp", eps=1e-5)
    t = torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    lik = ScoreMatchingLoss().weight(sde, t, 0.1)
    torch.testing.assert_close(lik, sde.importance_Z(0.1).expand(3))
    var = ScoreMatchingLoss(weighting="variance", time_sampling="uniform").weight(sde, t, 0.1)
    torch.testing.assert_close(var, torch.full((3,), 0.9, dtype=torch.float64))
    unscaled = ScoreMatchingLoss(scale_by_Z=False).weight(sde, t, 0.1)
    torch.testing.assert_close(unscaled, torch.ones(3, dtype=torch.float64))


def test_reconstruction_term_equals_the_density_difference():
    """R = log N(x_eps; mu x0, sigma^2) - log N(x0; (x_eps + sigma^2 s)/mu, (sigma/mu)^2), per sample."""
    sde, net, tau = SDES.build("vp", eps=1e-3), FixedNet(), 0.05
    x0 = data(16, 7)
    loss = ScoreMatchingLoss(reduce="sum")
    got = loss.reconstruction_term(net, sde, x0, tau, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # replay the same noise
    z = torch.randn(x0.shape, generator=g, dtype=x0.dtype)
    t = torch.full((16,), tau, dtype=torch.float64)
    mu, sigma = sde.mean_coef(t)[:, None], sde.std(t)[:, None]
    x = mu * x0 + sigma * z
    score = -net(x, t) / sigma
    N = torch.distributions.Normal
    ref = N(mu * x0, sigma).log_prob(x).sum(1) - N((x + sigma**2 * score) / mu, sigma / mu).log_prob(
        x0).sum(1)
    torch.testing.assert_close(got, ref)
    mean = ScoreMatchingLoss(reduce="mean").reconstruction_term(
        net, sde, x0, tau, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(mean, ref / 2)


def test_g2_P_needs_its_P():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="weighting_P"):
        ScoreMatchingLoss(weighting="g2_P")
