"""Solvers and samplers against closed forms: linear ODEs (matrix exponential, scipy's NFE),
and Gaussian data N(m, s^2 I) whose score is exact, so that every sampler's output moments
and the probability-flow map are known.  The sampler tests run on ST_TEST_DEVICE (default cpu):
the initial noise is drawn on the CPU and moved there."""

import math
from functools import partial
from typing import get_args

import conftest
import numpy as np
import pytest
import scipy.integrate
import torch
from conftest import DEVICE

from stcli.components.samplers import time_grid
from stcli.components.samplers.base import Schedule
from stcli.components.samplers.pc import langevin
from stcli.infra import solvers
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS, SDES

M, S = 0.5, 0.4  # the data: N(M, S^2 I)
MAT = torch.tensor([[-1.0, 2.0], [-3.0, -0.5]], dtype=torch.float64)


def linear(t, y):
    return y @ MAT.T


Gaussian = partial(conftest.Gaussian, m=M, s=S)  # the exact score of N(M, S^2 I) data


def draw(sde, n, d, seed=0):
    """Prior draws on DEVICE and the generator for the sampler's noise (on the CPU: the one that
    drew them; elsewhere a generator on the device)."""
    g = torch.Generator().manual_seed(seed)
    x = sde.prior_sample((n, d), generator=g, dtype=torch.float64).to(DEVICE)
    return x, g if DEVICE.type == "cpu" else torch.Generator(DEVICE).manual_seed(seed)


# --- solvers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("rtol", [1e-3, 1e-6])
def test_dopri5_matches_the_matrix_exponential_with_scipys_nfe(rtol):
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    y1, nfe = solvers.dopri5(linear, y0, 0.0, 2.0, rtol=rtol, atol=rtol)
    exact = torch.linalg.matrix_exp(2 * MAT) @ y0
    ref = scipy.integrate.solve_ivp(lambda t, y: MAT.numpy() @ y, (0, 2), y0.numpy(),
                                    method="RK45", rtol=rtol, atol=rtol)
    assert nfe == ref.nfev
    assert np.allclose(y1.numpy(), ref.y[:, -1], rtol=1e-9, atol=1e-12)
    assert (y1 - exact).abs().max() < 20 * rtol


def test_dopri5_backwards_tuple_state_and_independent_rows():
    y0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y1, _ = solvers.dopri5(linear, y0, 1.0, 0.0, rtol=1e-8, atol=1e-8, per_sample=True)
    assert torch.allclose(y1, y0 @ torch.linalg.matrix_exp(-MAT).T, atol=1e-7)
    alone, _ = solvers.dopri5(linear, y0[2:3], 1.0, 0.0, rtol=1e-8, atol=1e-8, per_sample=True)
    assert torch.equal(alone[0], y1[2])  # a row's steps depend on that row only
    (y, logp), _ = solvers.dopri5(lambda t, s: (s[0] @ MAT.T, torch.ones_like(s[1]) * t),
                                  (y0, torch.zeros(5, dtype=torch.float64)), 0.0, 2.0)
    assert torch.allclose(logp, torch.full((5,), 2.0, dtype=torch.float64))  # int_0^2 t dt


def test_per_part_error_norm_holds_a_small_part_to_the_tolerance():
    """A state of 400 decaying elements and one oscillating scalar z = sin(10 t): the RMS over
    all 401 elements lets z's error grow ~20x; the per-part norm keeps it near the tolerance."""
    def f(t, y):
        return -y[0], 10 * torch.cos(10 * t).reshape(1)

    y0 = (torch.ones(400, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    errs, nfes = {}, {}
    for norm in ("rms", "rms_per_part"):
        (x, z), nfes[norm] = solvers.dopri5(f, y0, 0.0, 3.0, rtol=1e-4, atol=1e-4, error_norm=norm)
        errs[norm] = abs(z.item() - math.sin(30.0))
        assert (x - math.exp(-3.0)).abs().max() < 1e-4
    assert errs["rms_per_part"] < 1e-4 < errs["rms"] and nfes["rms_per_part"] > nfes["rms"]
    parts = [torch.full((4, 3), 2.0), torch.full((4, 1), 0.5)]
    two = torch.tensor(2.0, dtype=torch.float64)
    torch.testing.assert_close(solvers.rms_norm(parts, False, per_part=True), two)
    torch.testing.assert_close(solvers.rms_norm(parts, True, per_part=True), two.expand(4))


def test_per_part_tolerances_and_the_max_norm():
    """One tolerance per part of the state: the oscillating scalar z = sin(10 t) held to 1e-7
    absolute while the 400 decaying elements have 1e-3; the max norm is the largest RMS of one
    row of one part."""
    def f(t, y):
        return -y[0], 10 * torch.cos(10 * t).expand(2)

    y0 = (torch.ones(2, 400, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    (x, z), nfe = solvers.dopri5(f, y0, 0.0, 3.0, rtol=(1e-3, 0.0), atol=(1e-3, 1e-7),
                                 error_norm="max")
    (_, z_loose), nfe_loose = solvers.dopri5(f, y0, 0.0, 3.0, rtol=1e-3, atol=1e-3, error_norm="max")
    assert (z - math.sin(30.0)).abs().max() < 1e-6 < (z_loose - math.sin(30.0)).abs().max()
    assert (x - math.exp(-3.0)).abs().max() < 1e-3 and nfe > nfe_loose
    parts = [torch.tensor([[1.0, 1.0], [3.0, 4.0]]), torch.tensor([0.5, -2.0])]
    torch.testing.assert_close(solvers.max_norm(parts), torch.tensor(12.5, dtype=torch.float64).sqrt())


def test_dopri5_step_is_fifth_order_with_a_fourth_order_error_estimate():
    y = (torch.tensor([1.0, 0.5], dtype=torch.float64),)
    f = lambda t, s: (linear(t, s[0]),)  # noqa: E731
    errs, ests = [], []
    for h in (0.1, 0.05, 0.025):
        h64 = torch.tensor(h, dtype=torch.float64)
        y_new, _, est = solvers.dopri5_step(f, h64 * 0, y, h64, f(0.0, y))
        exact = torch.linalg.matrix_exp(h * MAT) @ y[0]
        errs.append((y_new[0] - exact).norm().item())
        ests.append(est[0].norm().item())
    for r in (errs[0] / errs[1], errs[1] / errs[2]):
        assert 2**6 * 0.75 < r < 2**6 * 1.3  # local error O(h^6)
    for r in (ests[0] / ests[1], ests[1] / ests[2]):
        assert 2**5 * 0.75 < r < 2**5 * 1.3  # embedded estimate O(h^5)


def test_fixed_step_solvers_on_a_linear_ode():
    y0 = torch.tensor([1.0, 0.5], dtype=torch.float64)
    exact = torch.linalg.matrix_exp(MAT) @ y0
    for method, order in ((solvers.euler, 1), (solvers.heun, 2)):
        errs = [(method(linear, y0, np.linspace(0, 1, n + 1).tolist())[0] - exact).norm().item()
                for n in (100, 200, 400)]
        for r in (errs[0] / errs[1], errs[1] / errs[2]):
            assert 2**order * 0.85 < r < 2**order * 1.15
    assert solvers.heun(linear, y0, [0.0, 0.5, 1.0])[1] == 4


# --- time grids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", get_args(Schedule))
@pytest.mark.parametrize("sde_name", SDES.names())
def test_time_grids_run_from_T_to_eps(schedule, sde_name):
    sde = SDES.validate(sde_name)
    ts = time_grid(sde, 20, schedule)
    assert len(ts) == 21 and ts[0] == sde.T and ts[-1] == sde.eps
    assert all(a > b for a, b in zip(ts[:-1], ts[1:]))
    if schedule == "log_snr":  # equal steps in A(t) = log(sigma^2 / mu^2)
        steps = np.diff(sde.antiderivative(torch.tensor(ts, dtype=torch.float64)).numpy())
        assert np.allclose(steps, steps[0], rtol=1e-6)


# --- samplers on Gaussian data -------------------------------------------------------------------
SDE_CASES = {"ve": {"sigma_max": 400.0}, "rve": {"sigma_max": 400.0, "eps": 1e-3},
             "edm": {"sigma_max": 400.0, "eps": 2.5e-5}}  # prior close to p_T; others: defaults
ACCURATE = {  # settings accurate on every SDE; a newly registered sampler runs with its defaults
    "euler_maruyama": {"steps": 500, "schedule": "log_snr"},
    "pc": {"corrector": "none", "steps": 500, "schedule": "log_snr"},
    "euler": {"steps": 500}, "heun": {"steps": 60}, "dpm2m": {"steps": 40}, "unipc": {"steps": 40}}
VARIANTS = [  # the default grids of the stochastic samplers, and the other predictors/correctors
    ("vp", "euler_maruyama", {"steps": 1000}),
    ("ve", "euler_maruyama", {"steps": 1000}),
    ("vp", "pc", {"predictor": "ancestral", "corrector": "none", "steps": 1000}),
    ("ve", "pc", {"predictor": "ancestral", "corrector": "none", "steps": 1000}),
    ("rve", "pc", {"predictor": "ancestral", "corrector": "none", "steps": 1000,
                   "schedule": "log_snr"}),
    ("edm", "pc", {"predictor": "ancestral", "corrector": "none", "steps": 1000,
                   "schedule": "log_snr"}),
    ("vp", "pc", {"predictor": "euler_maruyama", "corrector": "langevin", "snr": 0.02,
                  "steps": 500}),
    ("ve", "pc", {"predictor": "euler_maruyama", "corrector": "langevin", "snr": 0.02,
                  "steps": 500}),
]
SAMPLER_CASES = [(sde, name, ACCURATE.get(name, {})) for sde in SDES.names()
                 for name in SAMPLERS.names()] + VARIANTS


def sde_case(name):
    return SDES.validate(name, **SDE_CASES.get(name, {}))


@pytest.mark.parametrize("sde_name,name,params", SAMPLER_CASES,
                         ids=[f"{s}-{n}-{'-'.join(map(str, p.values()))}" for s, n, p in SAMPLER_CASES])
def test_sampler_reproduces_gaussian_data_moments(sde_name, name, params):
    """Every sampler on every SDE (and the variants): mean and variance of n·d draws within 4.5
    standard errors: SE(mean) = s/sqrt(nd), SE(var/s^2) = sqrt(2/(nd)); the mean may also be off
    by the known prior mismatch.

    The Langevin corrector is unadjusted and its per-sample step 2 (snr ||z|| / ||s||)^2
    depends on the state: its variance bias grows with snr and shrinks with the dimension
    (+8% at snr 0.16, d = 64; see docs/sampling.md), so it is checked at snr 0.02, d = 128."""
    n, d = (64, 128) if params.get("corrector") == "langevin" else (250, 32)
    sde = sde_case(sde_name)
    score = Gaussian(sde)
    x, g = draw(sde, n, d)
    y, nfe = SAMPLERS.validate(name, **params)(score, sde, x, generator=g)
    assert nfe >= 1 and torch.isfinite(y).all()
    assert abs(y.mean().item() - M) < 4.5 * S / math.sqrt(n * d) + score.prior_bias()
    assert abs(y.var().item() / S**2 - 1) < 4.5 * math.sqrt(2 / (n * d))


def quick(name, **params):
    """Sampler `name` with its defaults, on a 10-step grid or at tolerance 1e-3 where it has one."""
    fields = type(SAMPLERS.validate(name)).model_fields
    fast = {"steps": 10} if "steps" in fields else {"rtol": 1e-3} if "rtol" in fields else {}
    return SAMPLERS.validate(name, **fast | params)


@pytest.mark.parametrize("sde_name", SDES.names())
@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_sampler_counts_its_score_calls_and_is_batch_independent(name, sde_name):
    """The NFE a sampler reports is the number of batched score evaluations it made, and with
    per-sample generators sample i does not depend on the batch it is drawn in."""
    sde, sampler = sde_case(sde_name), quick(name)
    if sde_name == "rve" and getattr(sampler, "schedule", None) == "uniform":
        sampler = quick(name, schedule="log_snr")  # a uniform grid is refused for the RVE
    exact, calls = Gaussian(sde), []

    def score(x, t):
        calls.append(len(x))
        return exact(x, t)

    gens = lambda ids: [torch.Generator().manual_seed(100 + i) for i in ids]  # noqa: E731
    x = sde.prior_sample((7, 3), generator=torch.Generator().manual_seed(0))
    together, nfe = sampler(score, sde, x, generator=gens(range(7)))
    assert nfe == len(calls) > 1 and set(calls) == {7}
    for i in (0, 4, 6):
        calls.clear()
        alone, nfe = sampler(score, sde, x[i:i + 1], generator=gens([i]))
        assert torch.equal(alone[0], together[i]) and nfe == len(calls)


@pytest.mark.parametrize("sde_name", SDES.names())
def test_ode_sampler_follows_the_closed_form_probability_flow(sde_name):
    sde = sde_case(sde_name)
    score = Gaussian(sde)
    x, _ = draw(sde, 64, 8)
    y, nfe = SAMPLERS.validate("ode", rtol=1e-5, atol=1e-5, denoise=False)(score, sde, x.float())
    assert (y.double() - score.flow(x, sde.eps)).abs().max() <= 1e-3
    assert nfe > 10


@pytest.mark.parametrize("sde_name", SDES.names())
@pytest.mark.parametrize("name,order", [("euler", 1), ("heun", 2), ("dpm2m", 2)])
def test_fixed_step_pf_samplers_converge_at_their_order(sde_name, name, order):
    sde = sde_case(sde_name)
    score = Gaussian(sde)
    x, _ = draw(sde, 16, 4)
    exact = score.flow(x, sde.eps)
    errs = [(SAMPLERS.validate(name, steps=k, denoise=False)(score, sde, x)[0] - exact)
            .abs().max().item() for k in (64, 128, 256)]
    for r in (errs[0] / errs[1], errs[1] / errs[2]):
        assert 2**order * 0.8 < r < 2**order * 1.25, errs


@pytest.mark.parametrize("sde_name", SDES.names())
def test_dpm2m_is_exact_for_a_point_mass(sde_name):
    """For data at a single point m the denoiser is the constant m, so the scaled flow
    x~ - m ∝ sigma~ is integrated exactly by the exponential step in any number of steps."""
    sde = sde_case(sde_name)
    point = Gaussian(sde)
    point.a2 = lambda t: sde.var(t)  # s = 0: p_t = N(mu m, sigma^2 I)
    x, _ = draw(sde, 8, 4)
    T, eps = (torch.tensor(v, dtype=torch.float64) for v in (sde.T, sde.eps))
    mu_T, mu_e = sde.mean_coef(T).item(), sde.mean_coef(eps).item()
    exact = mu_e * M + math.sqrt(sde.var(eps) / sde.var(T)) * (x - mu_T * M)
    for steps in (2, 3, 7):
        y, nfe = SAMPLERS.validate("dpm2m", steps=steps, denoise=False)(point, sde, x)
        assert nfe == steps
        torch.testing.assert_close(y, exact, rtol=1e-9, atol=1e-9)


def test_dpm2m_needs_two_steps():
    with pytest.raises(UserError, match="dpm2m is a two-step method: steps must be at least 2, not 1"):
        SAMPLERS.validate("dpm2m", steps=1)


def test_langevin_corrector_keeps_the_marginal_at_small_snr():
    sde = SDES.validate("ve", sigma_max=400.0)
    t = 0.3
    a = math.sqrt(Gaussian(sde).a2(torch.tensor(t, dtype=torch.float64)).item())
    g = torch.Generator().manual_seed(1)
    x = M + a * torch.randn(200, 64, generator=g, dtype=torch.float64)
    for _ in range(200):
        x = langevin(Gaussian(sde), sde, x, t, t - 1e-3, g, snr=0.05)
    n = x.numel()
    assert abs(x.mean().item() - M) < 4.5 * a / math.sqrt(n)
    assert abs(x.var().item() / a**2 - 1) < 4.5 * math.sqrt(2 / n) + 0.01  # + ULA bias ~snr^2


def test_pc_with_em_predictor_and_no_corrector_is_euler_maruyama():
    sde = SDES.validate("vp")
    x, _ = draw(sde, 8, 6)
    em = SAMPLERS.validate("euler_maruyama", steps=50)
    pc = SAMPLERS.validate("pc", predictor="euler_maruyama", corrector="none", steps=50)
    a, nfe_a = em(Gaussian(sde), sde, x, generator=torch.Generator(DEVICE).manual_seed(3))
    b, nfe_b = pc(Gaussian(sde), sde, x, generator=torch.Generator(DEVICE).manual_seed(3))
    assert torch.equal(a, b) and nfe_a == nfe_b == 51


def test_ancestral_is_refused_for_subvp():
    sde = SDES.validate("subvp")
    with pytest.raises(UserError, match="ancestral predictor is defined for SDEs with mu = 1 or"):
        SAMPLERS.validate("pc", predictor="ancestral")(Gaussian(sde), sde, draw(sde, 2, 2)[0])


def test_nfe_counts():
    sde = SDES.validate("vp")
    x, _ = draw(sde, 4, 2)
    cases = {("pc", 10, 2): 10 * 3 + 1, ("euler", 10, 1): 11, ("heun", 10, 1): 21,
             ("dpm2m", 10, 1): 11, ("dpm2m", 2, 1): 3}
    for (name, steps, corr), expected in cases.items():
        params = {"steps": steps} | ({"n_corrector": corr} if name == "pc" else {})
        assert SAMPLERS.validate(name, **params)(Gaussian(sde), sde, x)[1] == expected


@pytest.mark.parametrize("name,params", [("pc", {"steps": 20, "predictor": "ancestral"})])
def test_per_sample_generators_make_samples_batch_independent(name, params):
    """A non-default predictor (every sampler's defaults: the conformance test above)."""
    sde = SDES.validate("vp")
    sampler = SAMPLERS.validate(name, **params)
    gens = lambda ids: [torch.Generator().manual_seed(100 + i) for i in ids]  # noqa: E731
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    together, _ = sampler(Gaussian(sde), sde, x, generator=gens(range(7)))
    for i in (0, 4, 6):
        alone, _ = sampler(Gaussian(sde), sde, x[i:i + 1], generator=gens([i]))
        assert torch.equal(alone[0], together[i])


# --- settings that cannot run, or would not matter: refused before anything is drawn -------------
def test_a_stored_recipe_loads_whatever_the_stricter_sampling_checks_say(tmp_path):
    """The pre-sampling checks (RVE on a uniform grid, unipc's default order, snr) are not
    recipe validation: a checkpoint written before them still opens (to nll, export, resume
    with sample_every 0); sampling from it is refused."""
    from stcli.components.loading import open_checkpoint
    from stcli.components.recipe import load_recipe, parse_recipe
    from stcli.infra import checkpoint

    path = conftest.ROOT / "recipes" / "quickstart_digits.yaml"
    for sde, sample in (({"name": "rve"}, {"name": "euler_maruyama", "steps": 10}),
                        ({"name": "vp"}, {"name": "unipc", "steps": 3}),
                        ({"name": "vp"}, {"name": "pc", "snr": 5.0})):
        data = load_recipe(path).to_dict() | {"sde": sde, "sample": sample}
        recipe = parse_recipe(data, "a stored recipe")
        ckpt = tmp_path / "old.safetensors"
        checkpoint.save(ckpt, {"ema.w": torch.zeros(1)}, {"step": 1, "recipe": data})
        assert open_checkpoint(ckpt).recipe.sample.name == sample["name"]
        with pytest.raises(UserError):
            recipe.sample.check(recipe.sde)


def test_a_grid_uniform_in_t_is_refused_for_the_rve():
    """sigma ~ exp(-c/t): on a uniform grid it falls from ~45 to sigma_min within the last step
    at any step count, and the samples are noise (std 49 for data of std 0.5)."""
    rve = SDES.validate("rve")
    for name in ("pc", "euler_maruyama", "heun"):
        for steps in (10, 1000):
            with pytest.raises(UserError, match="a grid uniform in t cannot sample the RVE SDE"):
                SAMPLERS.validate(name, steps=steps, schedule="uniform").check(rve)
        SAMPLERS.validate(name, steps=10, schedule="log_snr").check(rve)  # fine
    SAMPLERS.validate("pc", steps=10, schedule="uniform").check(SDES.validate("ve"))  # fine


def test_a_collapsed_grid_is_refused():
    with pytest.raises(UserError, match="does not decrease strictly"):
        SAMPLERS.validate("dpm2m", steps=10, schedule="edm", rho=1e300).check(SDES.validate("vp"))


def test_unipc_checks_its_default_order_too():
    """The default order 3 in 3 steps ran order 2 and recorded 3: refused before sampling (a
    recipe stored in a checkpoint still loads; only an explicit order is refused at once)."""
    vp = SDES.validate("vp")
    with pytest.raises(UserError, match="never reaches order 3 in 3 steps.*reach order 2"):
        SAMPLERS.validate("unipc", steps=3).check(vp)
    with pytest.raises(UserError, match="never reaches order 3 in 3 steps"):
        SAMPLERS.validate("unipc", steps=3, order=3)
    SAMPLERS.validate("unipc", steps=3, order=2).check(vp)
    SAMPLERS.validate("unipc", steps=5).check(vp)


def test_the_ancestral_predictor_is_checked_before_sampling():
    with pytest.raises(UserError, match="ancestral predictor is defined for SDEs with mu = 1"):
        SAMPLERS.validate("pc", steps=3, predictor="ancestral").check(SDES.validate("subvp"))


def test_options_without_effect_are_refused():
    from stcli.jobs.sample import resolve_sampler

    recipe_sampler = SAMPLERS.validate("euler_maruyama", steps=5)
    none = {"name": "pc", "corrector": "none"}
    for overrides, message in (({**none, "snr": 0.3}, "snr would have no effect"),
                               ({**none, "n_corrector": 3}, "n_corrector would"),
                               ({"name": "pc", "schedule": "uniform", "rho": 3.0}, "rho would have")):
        with pytest.raises(UserError, match=message):
            resolve_sampler(recipe_sampler, overrides)
    # a default value there changes nothing (a dumped section, a tune-steps file): accepted
    resolve_sampler(recipe_sampler, {"name": "pc", "corrector": "none", "snr": 0.16, "rho": 7.0})
    with pytest.raises(UserError, match="snr 1e\\+308 is above 1"):
        SAMPLERS.validate("pc", snr=1e308).check(SDES.validate("vp"))


def test_an_ode_out_of_steps_is_a_user_error():
    spec = SAMPLERS.validate("ode", max_steps=3)
    with pytest.raises(UserError, match="the ode sampler dopri5 did not reach .* raise max_steps"):
        spec(lambda x, t: -x, SDES.validate("vp"), torch.randn(2, 4))
