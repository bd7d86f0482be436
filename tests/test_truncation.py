"""Truncation distributions against their CDFs computed independently by quadrature."""

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from stcli.infra.registry import TRUNCATIONS

EPS = 1e-5


def reference_cdf(k, eps=EPS):
    z, _ = integrate.quad(lambda u: np.exp(u * (1 - k)), np.log(eps), 0.0, epsrel=1e-12)
    return lambda t: integrate.quad(lambda u: np.exp(u * (1 - k)), np.log(eps), np.log(t),
                                    epsrel=1e-12)[0] / z


def draws(spec, n=3000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return np.array([spec.sample(g) for _ in range(n)])


@pytest.mark.parametrize("k", [0.0, 0.9, 1.0, 2.0, 3.0])
def test_power_law_against_its_cdf(k):
    p = TRUNCATIONS.build("power", k=k, eps=EPS)
    ref = reference_cdf(k)
    for t in (2e-5, 1e-3, 0.1, 0.7):  # the closed form equals the quadrature
        assert float(p.cdf(torch.tensor(t, dtype=torch.float64))) == pytest.approx(ref(t), rel=1e-8,
                                                                                    abs=1e-12)
    x = draws(p)
    assert x.min() >= EPS and x.max() <= 1.0
    assert stats.kstest(x, np.vectorize(ref)).pvalue > 1e-3


def test_hard_is_a_point_mass():
    h = TRUNCATIONS.build("hard", eps=1e-3)
    assert set(draws(h, 10)) == {1e-3}
    assert h.cdf(torch.tensor([5e-4, 1e-3, 0.5])).tolist() == [0.0, 1.0, 1.0]


def test_mixture_of_power_laws_against_its_cdf():
    m = TRUNCATIONS.build("mixture", eps=EPS, weights=[1.0, 3.0],
                          components=[{"name": "power", "k": 0.5}, {"name": "power", "k": 2.0}])
    r1, r2 = reference_cdf(0.5), reference_cdf(2.0)
    ref = np.vectorize(lambda t: 0.25 * r1(t) + 0.75 * r2(t))
    assert float(m.cdf(torch.tensor(0.01, dtype=torch.float64))) == pytest.approx(ref(0.01), rel=1e-8)
    assert stats.kstest(draws(m), ref).pvalue > 1e-3


def test_half_hard_half_power_mixture_table15():
    m = TRUNCATIONS.build("mixture", eps=EPS, weights=[0.5, 0.5],
                          components=[{"name": "hard"}, {"name": "power", "k": 0.9}])
    x = draws(m, n=4000)
    atoms = (x == EPS).sum()
    assert stats.binomtest(int(atoms), len(x), 0.5).pvalue > 1e-3
    ref = reference_cdf(0.9)
    assert stats.kstest(x[x > EPS], np.vectorize(ref)).pvalue > 1e-3
    assert float(m.cdf(torch.tensor(EPS, dtype=torch.float64))) == pytest.approx(0.5)


def test_mixture_components_share_eps():
    from stcli.infra.errors import UserError

    m = TRUNCATIONS.build("mixture", eps=1e-3, weights=[1], components=[{"name": "power"}])
    assert m.components[0].eps == 1e-3
    with pytest.raises(UserError, match="differs"):
        TRUNCATIONS.build("mixture", eps=1e-3, weights=[1],
                          components=[{"name": "power", "eps": 1e-4}])
    with pytest.raises(UserError, match="same length"):
        TRUNCATIONS.build("mixture", weights=[1, 2], components=[{"name": "hard"}])
