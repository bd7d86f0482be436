"""UniPC against independent references: the phi-functions and the step by quadrature of the
variation-of-constants integral, the closed-form probability flow of Gaussian data N(m, s^2 I)
(convergence orders), DDIM (`euler`) and DPM-Solver++(2M) (`dpm2m`) as special cases, the
evaluation count, and the refusal of an order the grid never reaches."""

import math
from functools import partial

import conftest
import numpy as np
import pytest
import scipy.integrate
import torch

from stcli.components.samplers import time_grid
from stcli.components.samplers.unipc import phi_minus, weights
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS, SDES

M, S = 0.5, 0.4
Gaussian = partial(conftest.Gaussian, m=M, s=S)  # the exact score of N(M, S^2 I) data
SDE_CASES = {"ve": {"sigma_max": 400.0}, "rve": {"sigma_max": 400.0, "eps": 1e-3}}


def sde_case(name):
    return SDES.validate(name, **SDE_CASES.get(name, {}))


def prior(sde, n=16, d=4):
    return sde.prior_sample((n, d), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("h", [1e-3, 0.3, 0.999, 1.0, 2.6, 8.0])
def test_phi_functions_match_quadrature(h):
    """phi_j(-h) = int_0^1 e^{-(1-u) h} u^{j-1}/(j-1)! du, on both sides of the switch at h = 1."""
    for j in (1, 2, 3, 4):
        def f(u, j=j):
            return math.exp(-(1 - u) * h) * u ** (j - 1) / math.factorial(j - 1)

        ref = scipy.integrate.quad(f, 0, 1, epsabs=0, epsrel=1e-13)[0]
        assert phi_minus(j, h) == pytest.approx(ref, rel=1e-11)


@pytest.mark.parametrize("r", [[-0.7, 1.0], [-0.5, -1.3], [-0.8, -2.1, 1.0]])
@pytest.mark.parametrize("h", [0.2, 1.7])
def test_step_is_exact_for_a_denoiser_polynomial_in_lambda(r, h):
    """With K differences solved exactly (K >= 2), the step integrates dx~/dlambda = D - x~
    without error when D is a polynomial of degree K in lambda; the reference is the
    variation-of-constants integral e^{-h} x_s + int_0^h e^{-(h - u)} D(u) du by quadrature."""
    coef = np.random.default_rng(len(r)).normal(size=len(r) + 1)
    D = np.polynomial.Polynomial(coef)  # D(u), u = lambda - lambda_s
    x_s = 0.37
    ref = math.exp(-h) * x_s + scipy.integrate.quad(lambda u: math.exp(-(h - u)) * D(u), 0, h,
                                                    epsabs=0, epsrel=1e-13)[0]
    diffs = [(D(rm * h) - D(0)) / rm for rm in r]
    step = math.exp(-h) * x_s - math.expm1(-h) * D(0)
    step += sum(w * dm for w, dm in zip(weights(r, h, "h"), diffs))
    assert step == pytest.approx(ref, rel=1e-10, abs=1e-12)
    assert weights(r, h, "expm1") == pytest.approx(weights(r, h, "h"), rel=1e-12)  # B(h) cancels


def test_one_difference_takes_half_of_b():
    """UniPC's one-difference coefficient: rho = 1/2, so B(h) rho is h/2 or (1 - e^{-h})/2."""
    assert weights([-0.6], 0.8, "h") == [0.4]
    assert weights([1.0], 0.8, "expm1") == [pytest.approx(-math.expm1(-0.8) / 2, rel=1e-15)]


ORDERS = [(1, False, 1), (1, True, 2), (2, False, 2), (2, True, 3), (3, False, 3), (3, True, 4)]


@pytest.mark.parametrize("sde_name", ["vp", "ve", "rve"])
@pytest.mark.parametrize("order,corrector,expected", ORDERS)
def test_unipc_converges_at_its_order(sde_name, order, corrector, expected):
    """The error to the closed-form flow of Gaussian data falls as h^p on the edm grid: UniP-p
    has order p, UniC raises it to p + 1 (slope of log error against log steps, 64-256 steps).
    The final order is not lowered here: a first-order last step would cap the order at 2."""
    sde = sde_case(sde_name)
    score, x = Gaussian(sde), prior(sde)
    exact = score.flow(x, sde.eps)
    ks = (64, 128, 256)
    errs = [(SAMPLERS.validate("unipc", steps=k, order=order, corrector=corrector,
                               lower_order_final=False, denoise=False)(score, sde, x)[0] - exact)
            .abs().max().item() for k in ks]
    slope = -np.polyfit(np.log(ks), np.log(errs), 1)[0]
    assert abs(slope - expected) < 0.2, (slope, errs)


@pytest.mark.parametrize("order,corrector,expected", [(1, True, 2), (2, False, 2)])
def test_the_expm1_variant_keeps_the_order(order, corrector, expected):
    """B(h) = 1 - e^{-h} changes the steps with one difference; their order stays."""
    sde = sde_case("vp")
    score, x = Gaussian(sde), prior(sde)
    exact = score.flow(x, sde.eps)
    ks = (64, 128, 256)
    errs = [(SAMPLERS.validate("unipc", steps=k, order=order, corrector=corrector, bh="expm1",
                               lower_order_final=False, denoise=False)(score, sde, x)[0] - exact)
            .abs().max().item() for k in ks]
    assert abs(-np.polyfit(np.log(ks), np.log(errs), 1)[0] - expected) < 0.2, errs


@pytest.mark.parametrize("sde_name", SDES.names())
@pytest.mark.parametrize("schedule", ["edm", "log_snr", "uniform"])
def test_order_one_predictor_is_ddim_and_order_two_with_expm1_is_dpm2m(sde_name, schedule):
    """UniP-1: x~_t = e^{-h} x~_s + (1 - e^{-h}) D_s is the Euler step in sigma~ of `euler`
    (DDIM).  UniP-2 with B(h) = 1 - e^{-h} and rho = 1/2 is
    (1 - e^{-h}) [D_s + (D_s - D_{s'}) h / (2 h')], DPM-Solver++(2M)."""
    sde = sde_case(sde_name)
    score, x = Gaussian(sde), prior(sde, 8, 3)
    unip = partial(SAMPLERS.validate, "unipc", steps=7, schedule=schedule, corrector=False,
                   lower_order_final=False)
    ddim, nfe = SAMPLERS.validate("euler", steps=7, schedule=schedule)(score, sde, x)
    one = unip(order=1)(score, sde, x)
    assert one[1] == nfe == 8
    torch.testing.assert_close(one[0], ddim, rtol=1e-12, atol=1e-12)
    two = unip(order=2, bh="expm1")(score, sde, x)
    dpm2m = SAMPLERS.validate("dpm2m", steps=7, schedule=schedule)(score, sde, x)[0]
    torch.testing.assert_close(two[0], dpm2m, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sde_name", SDES.names())
def test_unipc_is_exact_for_a_point_mass(sde_name):
    """Data at one point m: D = m is constant, every difference vanishes and the exponential
    step is exact, at any order and step count."""
    sde = sde_case(sde_name)
    point = Gaussian(sde)
    point.a2 = lambda t: sde.var(t)  # s = 0: p_t = N(mu m, sigma^2 I)
    x = prior(sde, 8, 4)
    T, eps = (torch.tensor(v, dtype=torch.float64) for v in (sde.T, sde.eps))
    mu_T, mu_e = sde.mean_coef(T).item(), sde.mean_coef(eps).item()
    exact = mu_e * M + math.sqrt(sde.var(eps) / sde.var(T)) * (x - mu_T * M)
    for order, steps in ((1, 1), (2, 3), (3, 5), (3, 9)):
        y, nfe = SAMPLERS.validate("unipc", order=order, steps=steps, denoise=False)(point, sde, x)
        assert nfe == steps
        torch.testing.assert_close(y, exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("denoise", [False, True])
def test_the_corrector_reuses_the_evaluation_at_the_predicted_point(denoise):
    """One evaluation per grid time before eps (+ one at eps with denoise), with or without the
    corrector; the evaluation at t_1 is at the predicted point (the same as without the
    corrector), and the corrector changes the result."""
    sde = sde_case("vp")
    x = prior(sde, 4, 3)
    steps = 8
    runs = {}
    for corrector in (False, True):
        calls = []

        def score(y, t, calls=calls):
            calls.append((y.clone(), t[0].item()))
            return Gaussian(sde)(y, t)

        y, nfe = SAMPLERS.validate("unipc", steps=steps, corrector=corrector, denoise=denoise)(score, sde, x)
        grid = time_grid(sde, steps, "edm")
        assert nfe == len(calls) == steps + denoise
        assert [t for _, t in calls] == pytest.approx(grid[:-1] + grid[-1:] * denoise, rel=1e-15)
        runs[corrector] = y, calls
    assert torch.equal(runs[True][1][1][0], runs[False][1][1][0])  # D at t_1 of the prediction
    assert not torch.equal(runs[True][1][2][0], runs[False][1][2][0])  # x_1 corrected
    assert (runs[True][0] - runs[False][0]).abs().max() > 1e-4


def test_an_order_the_grid_never_reaches_is_refused():
    with pytest.raises(UserError, match=r"sampler\.order: unipc never reaches order 3 in 4 steps "
                                        r"\(lowered at the first and last steps\): it needs at least 5"):
        SAMPLERS.validate("unipc", order=3, steps=4)
    with pytest.raises(UserError, match="never reaches order 2 in 1 steps .*at least 2 steps"):
        SAMPLERS.validate("unipc", order=2, steps=1, lower_order_final=False)
    with pytest.raises(UserError, match="order"):
        SAMPLERS.validate("unipc", order=4, steps=50)
    assert SAMPLERS.validate("unipc", order=3, steps=3, lower_order_final=False).order == 3
    assert SAMPLERS.validate("unipc", order=3, steps=5).order == 3


def test_the_cli_refuses_a_bad_order_in_one_message(capsys):
    code, out, err = conftest.st(capsys, "recipe", "validate", "recipes/quickstart_digits.yaml",
                                 "sample.name=unipc", "sample.order=3", "sample.steps=4")
    assert code == 2
    assert "sample.order: unipc never reaches order 3 in 4 steps" in err
    assert "Traceback" not in err + out
