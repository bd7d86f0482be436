"""stcli/jobs/diagnose.py against closed forms (Gaussian data with its exact score, the inverse CDF
of p_iw, quadrature of Eq. 10's importance density) and `st diagnose` on a tiny checkpoint."""

import json

import numpy as np
import pytest
import torch
from conftest import Gaussian, st
from scipy.integrate import quad

from stcli.components.sdes import RVE, VP
from stcli.components.truncation import Hard, Power
from stcli.jobs.diagnose import bound_integrand, iw_losses, iw_quantiles, lambda_P_density, log_grid

BMIN, BMAX, M, S, D = 0.1, 20.0, 0.3, 0.5, 16  # VP; data N(M, S^2 I) in D dimensions


def vp_numpy(t):
    """mu, sigma^2, g^2 of the VP SDE, written out independently of stcli.components.sdes."""
    b = BMIN * t + 0.5 * (BMAX - BMIN) * t**2
    return np.exp(-b / 2), -np.expm1(-b), BMIN + (BMAX - BMIN) * t


def test_fig1a_integrand_matches_the_closed_form_for_gaussian_data():
    # With the exact score, sigma s + z = -mu u/v + z mu^2 S^2/(sigma v) (u = x0 - M, v = mu^2 S^2
    # + sigma^2), so E||sigma s + z||^2 / D = mu^2 S^2 / v and the DSM integrand is
    # 1/2 g^2 mu^2 S^2 / (sigma^2 v); its NELBO form is 1/2 g^2/sigma^2 (mu^2 S^2/v - 1) = -g^2/(2v).
    sde = VP(beta_min=BMIN, beta_max=BMAX)
    grid = log_grid(1e-5, 1.0, 7)
    data = Gaussian(sde, D, M, S)
    out = bound_integrand(data, sde, data.sample(4000, 0), grid, torch.Generator().manual_seed(1))
    mu, var, g2 = vp_numpy(grid.numpy())
    v = mu**2 * S**2 + var
    dsm, nelbo = 0.5 * g2 * mu**2 * S**2 / (var * v), -0.5 * g2 / v
    assert np.all(np.abs(np.array(out["dsm"]) - dsm) < 5 * np.array(out["dsm_se"]) + 1e-9 * dsm)
    assert np.all(np.abs(np.array(out["nelbo"]) - nelbo) < 5 * np.array(out["nelbo_se"]) + 1e-6)
    assert out["dsm"][0] / out["dsm"][-1] > 1e4  # the imbalance of Fig. 1a


@pytest.mark.parametrize("tau", [1e-5, 0.1])
def test_fig6_iw_loss_mean_equals_the_truncated_bound(tau):
    # E_{t ~ p_iw,tau}[1/2 Z_tau E||sigma s + z||^2/D] = 1/2 int_tau^T g^2/sigma^2 mu^2 S^2/v dt.
    sde = VP(beta_min=BMIN, beta_max=BMAX)
    data = Gaussian(sde, D, M, S)
    out = iw_losses(data, sde, data.sample(500, 0), tau, 20000,
                    torch.Generator().manual_seed(2))
    loss = np.array(out["loss"])
    assert np.allclose(loss, 0.5 * out["Z"] * np.array(out["scaled_error"]))
    assert min(out["t"]) >= tau and max(out["t"]) <= 1.0

    def integrand(t):
        mu, var, g2 = vp_numpy(t)
        return 0.5 * g2 / var * mu**2 * S**2 / (mu**2 * S**2 + var)

    exact = quad(integrand, tau, 1.0, points=[1e-4, 1e-3, 1e-2], limit=200)[0]
    assert abs(loss.mean() - exact) < 4 * loss.std() / np.sqrt(len(loss))


def vp_quantile(u, tau):
    """Closed-form inverse CDF of p_iw,tau under VP: A = log(e^B - 1), B(t) a quadratic."""
    b = lambda t: BMIN * t + 0.5 * (BMAX - BMIN) * t**2  # noqa: E731
    a = lambda t: np.log(np.expm1(b(t)))  # noqa: E731
    target = a(tau) + np.asarray(u) * (a(1.0) - a(tau))
    bb = np.log1p(np.exp(target))
    return (-BMIN + np.sqrt(BMIN**2 + 2 * (BMAX - BMIN) * bb)) / (BMAX - BMIN)


def test_fig7_quantiles_match_the_closed_form_inverse_cdf():
    sde = VP(beta_min=BMIN, beta_max=BMAX)
    levels = [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0]
    for tau in (1e-5, 0.1):
        assert np.allclose(iw_quantiles(sde, tau, levels), vp_quantile(levels, tau), rtol=1e-9)
    q = iw_quantiles(sde, 1e-5)  # Fig. 7 (tau = eps): a quarter of all t below ~3e-3
    assert 2e-3 < q[1] < 5e-3 and 0.1 < q[2] < 0.12
    rve = RVE(sigma_min=1e-3, sigma_max=90.0, eps=1e-5)  # p_iw ∝ 1/t^2: 1/t linear in u
    tau, u = 1e-3, np.array([0.2, 0.5, 0.8])
    assert np.allclose(iw_quantiles(rve, tau, u), 1 / (1 / tau - u * (1 / tau - 1)), rtol=1e-9)


def test_fig6c_lambda_P_density_equals_F_P_q_over_E_P_Z():
    # Eq. (10): lambda_P/sigma^2 = F_P(t) g^2/sigma^2, normalised by int F_P q dt = E_P[Z_tau].
    sde, eps = VP(beta_min=BMIN, beta_max=BMAX), 1e-5
    q = lambda t: vp_numpy(t)[2] / vp_numpy(t)[1]  # noqa: E731  g^2 / sigma^2
    a = lambda t: np.log(np.expm1(BMIN * t + 0.5 * (BMAX - BMIN) * t**2))  # noqa: E731
    t = np.array([2e-5, 1e-3, 0.05, 0.5, 1.0])
    # P_1: pdf 1/(tau log(T/eps)), CDF log(t/eps)/log(T/eps)
    pdf = lambda tau: 1 / (tau * np.log(1 / eps))  # noqa: E731
    norm = quad(lambda s: pdf(np.exp(s)) * (a(1.0) - a(np.exp(s))) * np.exp(s),
                np.log(eps), 0.0, limit=200)[0]
    expected = np.log(t / eps) / np.log(1 / eps) * q(t) / norm
    got = lambda_P_density(sde, Power(k=1.0, eps=eps), torch.tensor(t)).numpy()
    assert np.allclose(got, expected, rtol=1e-5)
    hard = lambda_P_density(sde, Hard(eps=eps), torch.tensor(t)).numpy()  # = p_iw,eps
    assert np.allclose(hard, q(t) / (a(1.0) - a(eps)), rtol=1e-5)


# --- the command ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt




FAST = ["--limit", "8", "--points", "4", "--samples", "16", "--device", "cpu"]


def test_st_diagnose_writes_plot_and_json(ckpt, tmp_path, capsys):
    code, out, err = st(capsys, "diagnose", ckpt, "--out", tmp_path / "d", *FAST, "--tau", "0.05")
    assert code == 0, err
    assert "integrand" in out and (tmp_path / "d" / "diagnose.png").stat().st_size > 1000
    res = json.loads((tmp_path / "d" / "diagnose.json").read_text())
    assert len(res["integrand"]["t"]) == 4 and res["integrand"]["t"][0] == pytest.approx(1e-5)
    assert [row["tau"] for row in res["iw"]] == [1e-5, 0.05]
    assert all(len(row["loss"]) == 16 for row in res["iw"])
    assert res["n_data"] == 8 and res["settings"]["weights"] == "ema"
    code, out, err = st(capsys, "diagnose", ckpt, "--out", tmp_path / "j", *FAST, "--json")
    assert code == 0 and json.loads(out)["step"] == 2
    # a --limit above the split's size: the items used are recorded and said, not the limit
    code, out, err = st(capsys, "diagnose", ckpt, "--out", tmp_path / "k", *FAST[2:], "--limit",
                        "100000", "--split", "test")
    res = json.loads((tmp_path / "k" / "diagnose.json").read_text())
    assert code == 0 and res["settings"]["limit"] == 100000 and 2 <= res["n_data"] < 100000
    assert f"the test split holds {res['n_data']} items; using them all" in out + err


@pytest.mark.parametrize("args, message", [
    (["--tau", "2"], "--tau must lie in"),
    (["--weights", "bad"], "Invalid value for '--weights'"),
    (["--limit", "1"], "--limit is too small"),
])
def test_st_diagnose_user_errors_exit_2(ckpt, tmp_path, capsys, args, message):
    code, out, err = st(capsys, "diagnose", ckpt, "--out", tmp_path, *FAST[2:], *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_st_diagnose_missing_checkpoint(tmp_path, capsys):
    code, _, err = st(capsys, "diagnose", tmp_path / "nope.safetensors")
    assert code == 2 and "Traceback" not in err
