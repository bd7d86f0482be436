"""Stable Target Field targets against independent references: the naive B x n x d formula,
the closed-form posterior mean of a Gaussian mixture, and the delta-method variance of a
self-normalised importance-sampling estimate."""

import math
from pathlib import Path

import pytest
import torch

from stcli.components.losses import ScoreMatchingLoss
from stcli.components.stf import STF, EssBins, Reference, effective_sample_size, stf_target, stf_weights
from stcli.infra.registry import SDES

# A ring of K equally weighted Gaussians N(m_k, s^2 I) in 2-D.
K, RADIUS, S = 8, 2.0, 0.1
ANGLES = 2 * math.pi * torch.arange(K, dtype=torch.float64) / K
MEANS = RADIUS * torch.stack([ANGLES.cos(), ANGLES.sin()], 1)


def mixture(n, g):
    return MEANS[torch.randint(K, (n,), generator=g)] + S * torch.randn(n, 2, generator=g,
                                                                       dtype=torch.float64)


def posterior(x, mu, sig):
    """E[x0 | x_t = x] and tr Cov[x0 | x_t = x] for x_t = mu x0 + sig z, in closed form."""
    v = mu**2 * S**2 + sig**2  # x_t | k ~ N(mu m_k, v I)
    resp = torch.softmax(-((x[:, None] - mu * MEANS) ** 2).sum(-1) / (2 * v), 1)
    m_k = MEANS + (mu * S**2 / v) * (x[:, None] - mu * MEANS)  # E[x0 | x_t, k]
    mean = (resp[..., None] * m_k).sum(1)
    second = (resp * ((m_k**2).sum(-1) + 2 * S**2 * sig**2 / v)).sum(1)  # E||x0||^2 | x_t
    return mean, second - (mean**2).sum(1)


def log_density(x, mu, sig):
    """log p_t(x) of the mixture at time t."""
    v = mu**2 * S**2 + sig**2
    log_k = -((x[:, None] - mu * MEANS) ** 2).sum(-1) / (2 * v) - math.log(2 * math.pi * v)
    return torch.logsumexp(log_k, 1) - math.log(K)


def delta_method_variance(x, mean, mu, sig, n, g, draws=20000):
    """(1/n) E_y[r(y)^2 ||y - m||^2] with r = N(x; mu y, sig^2)/p_t(x), y ~ data: the variance
    of a self-normalised importance-sampling estimate of E[x0|x] from n data samples."""
    y = mixture(draws, g)
    log_r = (-((x[:, None] - mu * y) ** 2).sum(-1) / (2 * sig**2) - math.log(2 * math.pi * sig**2)
             - log_density(x, mu, sig)[:, None])
    return ((2 * log_r).exp() * ((y - mean[:, None]) ** 2).sum(-1)).mean(1) / n


def stf_squared_errors(mu, sig, batch, n, reps, seed):
    """||T_i - E[x0|x_t]||^2 over `reps` fresh batches, each the first rows of its reference."""
    g = torch.Generator().manual_seed(seed)
    errors, xs, means = [], [], []
    for _ in range(reps):
        reference = mixture(n, g)
        x0 = reference[:batch]
        x = mu * x0 + sig * torch.randn(batch, 2, generator=g, dtype=torch.float64)
        mean, _ = posterior(x, mu, sig)
        coef = torch.full((batch,), mu, dtype=torch.float64)
        T = stf_target(x, coef, torch.full((batch,), sig, dtype=torch.float64), reference)
        errors.append(((T - mean) ** 2).sum(1))
        xs.append(x)
        means.append(mean)
    return torch.cat(errors), torch.cat(xs), torch.cat(means)


@pytest.mark.parametrize("sigma", [1e-4, 1e-2, 1.0, 1e3])
def test_matmul_form_equals_the_naive_formula(sigma):
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(37, 3, 4, 4, generator=g) * 2 - 1
    x0 = ref[:5]
    mu = torch.rand(5, generator=g) * 0.5 + 0.5
    std = sigma * (torch.rand(5, generator=g) + 0.5)
    x = mu[:, None, None, None] * x0 + std[:, None, None, None] * torch.randn(x0.shape, generator=g)
    diff = x.double().flatten(1)[:, None] - mu.double()[:, None, None] * ref.double().flatten(1)
    w = torch.softmax(-diff.pow(2).sum(-1) / (2 * std.double()[:, None] ** 2), 1)  # B x n x d
    expected = (w @ ref.double().flatten(1)).view_as(x)
    got = stf_target(x, mu, std, ref)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stf_weights(x, mu, std, ref, chunk=8), w, atol=1e-9, rtol=1e-7)


def test_collapses_to_the_ordinary_target_as_sigma_vanishes():
    g = torch.Generator().manual_seed(1)
    ref = torch.rand(64, 2, 8, 8, generator=g) * 2 - 1
    x0, z = ref[:16], torch.randn(16, 2, 8, 8, generator=g)
    mu, std = torch.full((16,), 0.999), torch.full((16,), 1e-6)
    x = mu[:, None, None, None] * x0 + std[:, None, None, None] * z
    assert torch.equal(stf_target(x, mu, std, ref), x0)
    assert torch.equal(STF().noise_target(x, x0, z, mu, std, ref), z)
    assert torch.allclose(effective_sample_size(stf_weights(x, mu, std, ref)),
                          torch.ones(16, dtype=torch.float64))


def test_noise_target_is_the_score_target_of_T():
    """z + mu (x0 - T)/sigma == (x_t - mu T)/sigma, the form the seed states."""
    g = torch.Generator().manual_seed(2)
    ref = torch.randn(50, 6, generator=g, dtype=torch.float64)
    x0, z = ref[:10], torch.randn(10, 6, generator=g, dtype=torch.float64)
    mu, std = torch.rand(10, generator=g, dtype=torch.float64), torch.rand(10, generator=g,
                                                                         dtype=torch.float64)
    x = mu[:, None] * x0 + std[:, None] * z
    bins = EssBins(SDES.build("vp"), 1e-5, torch.device("cpu"), bins=1)
    got = STF().noise_target(x, x0, z, mu, std, Reference(ref, bins))
    expected = (x - mu[:, None] * stf_target(x, mu, std, ref)) / std[:, None]
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)
    ess = effective_sample_size(stf_weights(x, mu, std, ref))
    assert ((ess >= 1 - 1e-12) & (ess <= 50 + 1e-9)).all()
    logged = bins.flush()  # one bin: the mean ESS of the 10 samples
    assert logged["count"] == [10] and logged["ess"][0] == pytest.approx(ess.mean().item(), rel=1e-12)


def test_converges_to_the_posterior_mean_like_one_over_sqrt_n():
    """Mean squared error to the closed-form E[x0|x_t] at an intermediate time: ~ c/n."""
    mu, sig = 0.8, 0.6
    mse = {n: stf_squared_errors(mu, sig, 256, n, reps=8, seed=n)[0].mean().item()
           for n in (256, 4096)}
    rmse_ratio = math.sqrt(mse[256] / mse[4096])  # sqrt(4096 / 256) = 4
    assert 4 / 1.3 < rmse_ratio < 4 * 1.3
    assert math.sqrt(mse[4096]) < 0.02 * RADIUS


def test_target_variance_shrinks_by_the_predicted_factor():
    """At an intermediate t, E||T - E[x0|x_t]||^2 (the target's covariance trace up to a bias
    of order 1/n^2) against the delta-method prediction, and both against the ordinary target's
    tr Cov[x0|x_t]; the reduction factor is of the order 1/(n-1) the seed states."""
    mu, sig, n = 0.8, 0.6, 256
    reps = 24
    errors, x, mean = stf_squared_errors(mu, sig, 256, n, reps=reps, seed=5)
    per_rep = errors.view(reps, -1).mean(1)  # rows of one rep share a reference batch
    measured, se = per_rep.mean().item(), per_rep.std().item() / math.sqrt(reps)
    predicted = delta_method_variance(x, mean, mu, sig, n, torch.Generator().manual_seed(6),
                                      draws=4000).mean().item()
    assert abs(measured - predicted) < 0.1 * predicted + 4 * se
    ordinary = posterior(x, mu, sig)[1].mean().item()  # tr Cov of the DSM target x0
    factor = measured / ordinary
    assert 1 / (n - 1) < factor < 4 / (n - 1)


def test_memory_stays_small_at_cifar_scale():
    """B = 64, n = 4096, d = 3072: peak extra resident memory < 200 MB (a B x n x d float32
    tensor alone would be 3.2 GB). Linux: reset the high-water mark, read VmHWM."""
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.fail("this test needs Linux /proc to measure resident memory")
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(4096, 3, 32, 32, generator=g)
    x = torch.rand(64, 3, 32, 32, generator=g)
    mu, std = torch.full((64,), 0.9), torch.full((64,), 0.4)

    def kib(field):
        line = next(s for s in status.read_text().splitlines() if s.startswith(field))
        return int(line.split()[1])

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = kib("VmRSS:")
    stf_target(x, mu, std, ref)
    extra_mb = (kib("VmHWM:") - before) / 1024
    assert extra_mb < 200, f"peak extra memory {extra_mb:.0f} MB"


def test_loss_with_stf_target_on_every_sde():
    """The stf option runs with every SDE and weighting and reports (sigma, ESS) per sample."""
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    net = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for sde in ("ve", "vp", "subvp", "rve"):
        spec = SDES.build(sde)
        for weighting in ("likelihood", "variance"):
            loss = ScoreMatchingLoss(weighting=weighting, target={"name": "stf",
                                                                  "reference_batch": 8})
            bins = EssBins(spec, 1e-3, torch.device("cpu"))
            out = loss(net, spec, x0, 1e-3, generator=torch.Generator().manual_seed(4),
                       reference=Reference(x0, bins))
            assert out.shape == (8,) and torch.isfinite(out).all()
            assert sum(bins.flush()["count"]) == 8
