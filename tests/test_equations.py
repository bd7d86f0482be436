"""The shared equation helpers: squared norms, the probability-flow drift, the SDE flags the
samplers dispatch on, and the loss's time density q/N."""

import pytest
import torch
from conftest import Gaussian
from scipy.integrate import quad

from stcli.components.losses import ScoreMatchingLoss
from stcli.components.sdes import bcast, flow_drift, sum_squares
from stcli.infra.registry import SDES


def test_sum_squares_per_row_and_bf16_safe():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    exact = torch.tensor([sum(v * v for v in row.flatten().tolist()) for row in x], dtype=torch.float64)
    torch.testing.assert_close(sum_squares(x), exact, rtol=1e-14, atol=0)
    big = torch.full((2, 4096), 3.0, dtype=torch.bfloat16)  # bf16 would round the running sum
    assert sum_squares(big).dtype == torch.float32 and sum_squares(big).tolist() == [9.0 * 4096] * 2


def test_bcast_shapes():
    x = torch.zeros(3, 2, 5)
    assert bcast(torch.arange(3.0), x).shape == (3, 1, 1)
    assert bcast(torch.tensor(2.0), x).shape == ()


def test_flow_drift_on_gaussian_data_is_the_closed_form():
    """Data N(0, s^2 I): p_t = N(0, (mu^2 s^2 + sigma^2) I), so
    F = -beta/2 x + beta/2 x / (mu^2 s^2 + sigma^2)."""
    sde, s2 = SDES.build("vp"), 0.3
    t = torch.tensor([0.01, 0.4, 0.9], dtype=torch.float64)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    beta = bcast(sde.g2(t), x)
    expected = -0.5 * beta * x + 0.5 * beta * x / bcast(sde.mean_coef(t) ** 2 * s2 + sde.var(t), x)
    score = Gaussian(sde, m=0.0, s=s2**0.5)
    torch.testing.assert_close(flow_drift(score, sde, x, t), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", SDES.names())
def test_sde_flags_match_the_closed_forms(name):
    sde = SDES.build(name)
    t = torch.linspace(sde.eps, sde.T, 50, dtype=torch.float64)
    mu, var = sde.mean_coef(t), sde.var(t)
    assert sde.unit_mean == bool(torch.allclose(mu, torch.ones_like(mu), rtol=0, atol=1e-12))
    assert sde.variance_preserving == bool(torch.allclose(mu**2 + var, torch.ones_like(mu), atol=1e-12))


@pytest.mark.parametrize("sampling", ["importance", "uniform", "lognormal"])
@pytest.mark.parametrize("sde_name", ["vp", "ve"])
def test_time_density_q_over_N_integrates_to_one(sampling, sde_name):
    """p(t) = q(t)/N is a probability density on [tau, T] (quadrature), and weight() is
    N lambda/(sigma^2 q) with lambda = g^2 for the likelihood weighting."""
    sde, tau = SDES.build(sde_name, eps=1e-5), 1e-3
    loss = ScoreMatchingLoss(time_sampling=sampling)
    norm = loss.norm(sde, tau)

    def p(t):
        return float(loss.q(sde, torch.tensor([t], dtype=torch.float64), tau)[0]) / norm

    points = [tau * 10**k for k in range(1, 3)]
    assert quad(p, tau, sde.T, points=points, limit=200)[0] == pytest.approx(1.0, rel=1e-6)
    t = torch.tensor([0.01, 0.5], dtype=torch.float64)
    expected = norm * sde.g2(t) / (sde.var(t) * loss.q(sde, t, tau))
    torch.testing.assert_close(loss.weight(sde, t, tau), expected)
