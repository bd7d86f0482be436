"""EDM-style training (Karras et al. 2022) against independent references: preconditioning
against the exact denoiser of Gaussian data, the EDM weighting as unit weight on the raw
network output, log-normal noise levels against scipy's truncated normal, and the 35-NFE
Heun sampler."""

import math

import pytest
import torch
from conftest import Gaussian
from scipy import stats

from stcli.components.losses import ScoreMatchingLoss
from stcli.components.nets import ScoreModel, c_in, c_out, c_skip, noise_out, noise_skip
from stcli.infra.registry import SAMPLERS, SDES

SD = 0.5


class Zero(torch.nn.Module):
    def forward(self, x, eta):
        return torch.zeros_like(x)


class Fixed(torch.nn.Module):
    """A fixed smooth F(x, eta) with no trainable parameters."""

    def forward(self, x, eta):
        return torch.tanh(0.7 * x.flip(-1) + 0.1 * eta.view(-1, *[1] * (x.dim() - 1)))


def test_preconditioning_coefficients_are_edms_table_1():
    """c_skip, c_out, c_in against Karras et al. 2022, Table 1 in plain float arithmetic, and
    the noise coefficients (1 - c_skip)/s, c_out/s accurate where 1 - c_skip cancels."""
    for s in (1e-3, 0.1, 0.5, 2.0, 80.0):
        st = torch.tensor(s, dtype=torch.float64)
        assert float(c_skip(st, SD)) == pytest.approx(SD**2 / (s**2 + SD**2), rel=1e-14)
        assert float(c_out(st, SD)) == pytest.approx(s * SD / math.sqrt(SD**2 + s**2), rel=1e-14)
        assert float(c_in(st, SD)) == pytest.approx(1 / math.sqrt(s**2 + SD**2), rel=1e-14)
        assert float(noise_skip(st, SD)) == pytest.approx((1 - SD**2 / (s**2 + SD**2)) / s, rel=1e-9)
        assert float(noise_out(st, SD)) == pytest.approx(SD / math.sqrt(SD**2 + s**2), rel=1e-14)
    tiny = torch.tensor(1e-12, dtype=torch.float32)  # 1 - c_skip rounds to 0 in float32
    assert float(1 - c_skip(tiny, SD)) == 0.0
    assert float(noise_skip(tiny, SD)) == pytest.approx(1e-12 / SD**2, rel=1e-6)
    assert float(c_out(tiny, SD)) == pytest.approx(1e-12, rel=1e-6)


@pytest.mark.parametrize("name", SDES.names())
def test_preconditioning_with_zero_output_is_the_exact_gaussian_denoiser(name):
    """Data N(0, SD^2 I): the exact noise prediction is sigma x / (mu^2 SD^2 + sigma^2)."""
    sde = SDES.build(name)
    model = ScoreModel(Zero(), sde, "log_sigma", "edm", SD).double()
    t = torch.logspace(-4, 0, 9, dtype=torch.float64).clamp(min=sde.eps)
    x = torch.randn(9, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu, sigma = sde.mean_coef(t).view(-1, 1, 1, 1), sde.std(t).view(-1, 1, 1, 1)
    torch.testing.assert_close(model(x, t), sigma * x / (mu**2 * SD**2 + sigma**2))


def test_edm_weighting_is_unit_weight_on_the_network_output():
    """(s^2 + SD^2)/SD^2 ||eps - z||^2 = ||F - F*||^2 with F* = (x0 - c_skip x~)/c_out."""
    sde, tau = SDES.build("edm", eps=2.5e-5), 2.5e-5
    loss = ScoreMatchingLoss(weighting="edm", time_sampling="lognormal", reduce="sum")
    model = ScoreModel(Fixed(), sde, "log_sigma", "edm", SD).double()
    x0 = torch.rand(64, 2, 3, 3, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64) - 0.5
    got = loss(model, sde, x0, tau, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)  # replay the loss's draws: t, then z
    t = loss.sample_time(sde, 64, tau, g, "cpu").double()
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    s = sde.std(t).view(-1, 1, 1, 1)
    x = x0 + s * z
    c_skip, c_out = SD**2 / (s**2 + SD**2), s * SD / (s**2 + SD**2).sqrt()
    c_in = 1 / (s**2 + SD**2).sqrt()
    eta = sde.time_input(t, "log_sigma")
    target = (x0 - c_skip * x) / c_out
    expected = 0.5 * (Fixed()(c_in * x, eta) - target).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-8)  # t is drawn in float32


@pytest.mark.parametrize("tau", [2.5e-5, 1e-2])
def test_lognormal_noise_levels_follow_the_truncated_normal(tau):
    sde = SDES.build("edm", eps=2.5e-5)
    loss = ScoreMatchingLoss(time_sampling="lognormal", lognormal_mean=-1.2, lognormal_std=1.2)
    t = loss.sample_time(sde, 20000, tau, torch.Generator().manual_seed(3), "cpu").double()
    log_sigma = sde.std(t).log().numpy()
    lo, hi = (math.log(80.0 * tau) + 1.2) / 1.2, (math.log(80.0) + 1.2) / 1.2
    assert stats.kstest(log_sigma, stats.truncnorm(lo, hi, loc=-1.2, scale=1.2).cdf).pvalue > 1e-3
    assert t.min() >= tau and t.max() <= 1.0


def test_lognormal_importance_weights_integrate_the_weighting():
    """With lognormal t, weight = lambda/(sigma^2 p): E[weight * sigma^2/g^2] = E[1/p] = T - tau."""
    sde, tau = SDES.build("vp", eps=1e-5), 1e-3
    loss = ScoreMatchingLoss(time_sampling="lognormal", lognormal_mean=-1.0, lognormal_std=2.0)
    t = loss.sample_time(sde, 200000, tau, torch.Generator().manual_seed(4), "cpu").double()
    v = loss.weight(sde, t, tau).double() * sde.var(t) / sde.g2(t)
    mean, se = v.mean().item(), v.std().item() / math.sqrt(len(v))
    assert abs(mean - (1 - tau)) < 4 * se + 1e-3


def test_edm_weighting_needs_lognormal_times():
    with pytest.raises(ValueError, match="weighting edm is defined with time_sampling lognormal"):
        ScoreMatchingLoss(weighting="edm")


def heun_factor(sigmas, sd):
    """Karras et al. Alg. 1 (Heun) on dx/dsigma = sigma x/(sd^2 + sigma^2), the flow of
    N(0, sd^2) data, from x = 1: a scalar reference written out independently."""
    x, f = 1.0, lambda s, x: s * x / (sd**2 + s**2)  # noqa: E731
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        d1 = f(a, x)
        d2 = f(b, x + (b - a) * d1)
        x += (b - a) * (d1 + d2) / 2
    return x


def test_heun_35_nfe_is_edms_sampler():
    """17 Heun steps on EDM's rho = 7 grid from sigma 80 to 0.002 + the final denoising step
    (= EDM's last Euler step to sigma = 0) = 35 NFE, EDM's CIFAR-10 sampler; with the exact
    score of N(0, SD^2) every sample is x_T times the scalar reference's factor."""
    sde = SDES.build("edm", eps=2.5e-5)
    sampler = SAMPLERS.build("heun", steps=17, schedule="edm", denoise=True)
    x = sde.prior_sample((100, 4), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    score = Gaussian(sde, m=0.0, s=SD)
    y, nfe = sampler(score, sde, x, torch.Generator().manual_seed(6))
    assert nfe == 35
    sigmas = [(80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7 for i in range(18)]
    factor = heun_factor(sigmas, SD) * SD**2 / (SD**2 + 0.002**2)  # then Tweedie at 0.002
    torch.testing.assert_close(y, x * factor, rtol=1e-9, atol=1e-12)
    assert abs(80 * factor - SD) / SD < 0.06  # 18 steps: within 6% of the exact flow's SD
