"""Tuned time steps (`st tune-steps`): the warp of Eq. (1) of stcli.components.samplers.tuning
against its closed-form quantiles, the compass search against a known minimum, explicit `times`
on every grid sampler, and the tuned grid's error against the closed-form flow of Gaussian
data; then the command end to end (the file it writes is what `st sample --sampler-file` and
a recipe read)."""

import math
from functools import partial

import conftest
import pytest
import torch
import yaml

from stcli.components.samplers import time_grid
from stcli.components.samplers.tuning import KNOTS, compass_search, rmse, warp, warped_times
from stcli.infra.errors import UserError
from stcli.infra.registry import SAMPLERS, SDES

Gaussian = partial(conftest.Gaussian, m=0.5, s=0.4)
SDE_CASES = {"ve": {"sigma_max": 50.0}, "rve": {"sigma_max": 50.0, "eps": 1e-3}}


@pytest.mark.parametrize("slope", [-3.0, 0.0, 0.7, 5.0])
def test_warp_is_the_quantile_function_of_its_density(slope):
    """With l(u) = a u (knots on a line) q is exponential: Q(v) = log(1 + v (e^a - 1)) / a."""
    c = [slope * k / (KNOTS - 1) for k in range(1, KNOTS)]
    v = torch.arange(11, dtype=torch.float64) / 10
    exact = v if slope == 0 else torch.log1p(v * math.expm1(slope)) / slope
    assert torch.allclose(warp(c, 10), exact, atol=1e-6)


def test_warp_keeps_the_steps_distinct():
    for c in ([6.0, -6.0, 6.0, -6.0], [40.0, 0.0, 0.0, -40.0], [-40.0, -40.0, -40.0, -40.0]):
        assert bool((warp(c, 50).diff() > 0).all()), c


@pytest.mark.parametrize("schedule", ["uniform", "log_snr", "edm"])
def test_no_warp_is_the_schedule(schedule):
    sde = SDES.validate("vp")
    assert warped_times(sde, 7, schedule, 7.0, [0.0] * (KNOTS - 1)) == pytest.approx(
        time_grid(sde, 7, schedule), rel=1e-12)


def test_compass_search_finds_the_minimum_and_counts_its_calls():
    calls = []

    def f(x):
        calls.append(x)
        return (x[0] - 1.3) ** 2 + 3 * (x[1] + 0.4) ** 2 + 1.0

    x, fx, evals = compass_search(f, [0.0, 0.0], min_step=1 / 64)
    assert x == pytest.approx([1.3, -0.4], abs=1 / 64) and fx == f(x)
    assert evals == len(calls) - 1  # the check f(x) above is the extra call
    assert compass_search(f, [0.0, 0.0], budget=5)[2] == 5


@pytest.mark.parametrize("name", ["euler", "heun", "dpm2m", "unipc"])
def test_explicit_times_are_the_grid(name):
    """times equal to a schedule's grid give the schedule's samples, bit for bit."""
    sde = SDES.validate("vp")
    data = Gaussian(sde)
    x = sde.prior_sample((8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    on_schedule = SAMPLERS.validate(name, steps=6, schedule="log_snr")
    explicit = SAMPLERS.validate(name, times=time_grid(sde, 6, "log_snr"))
    assert explicit.steps == 6
    assert torch.equal(on_schedule(data, sde, x)[0], explicit(data, sde, x)[0])


@pytest.mark.parametrize("settings, message", [
    ({"times": [1.0, 0.5, 0.5, 1e-5]}, "decrease strictly"),
    ({"times": [1.0, 0.5, 1e-5], "steps": 5}, "3 times, i.e. 2 steps, but steps is 5"),
    ({"times": [1.0, float("nan"), 1e-5]}, "times.1: Input should be a finite number"),
    ({"times": [1.0, 0.5, -1e-5]}, "finite and positive"),
    ({"times": [1.0]}, "at least two times"),
])
def test_bad_times_are_refused(settings, message):
    with pytest.raises(UserError, match=message):
        SAMPLERS.validate("unipc", order=1, **settings)


def test_times_off_the_sdes_ends_are_refused():
    sampler = SAMPLERS.validate("dpm2m", times=[1.0, 0.3, 1e-3])
    with pytest.raises(UserError, match="from the SDE's T = 1.0 to its eps = 1e-05: the last time is 0.001"):
        sampler.check(SDES.validate("vp"))


@pytest.mark.parametrize("sde_name", SDES.names())
def test_tuned_grid_is_closer_to_the_exact_flow(sde_name):
    """On Gaussian data (exact score, closed-form flow) the grid tuned on one set of draws has a
    smaller error to the exact flow than the best schedule, on other draws."""
    sde = SDES.validate(sde_name, **SDE_CASES.get(sde_name, {}))
    data = Gaussian(sde)
    draws = [sde.prior_sample((64, 4), generator=torch.Generator().manual_seed(s),
                              dtype=torch.float64) for s in (0, 1)]
    exact = [data.flow(x, sde.eps) for x in draws]

    def error(spec, k):
        return rmse(spec.integrate(data, sde, draws[k], None)[0], exact[k])

    base = min(("uniform", "log_snr", "edm"),
               key=lambda g: error(SAMPLERS.validate("unipc", steps=5, schedule=g), 0))

    def tuned(c):
        return SAMPLERS.validate("unipc", times=warped_times(sde, 5, base, 7.0, c))

    c, best, _ = compass_search(lambda c: error(tuned(c), 0), [0.0] * (KNOTS - 1))
    before = error(SAMPLERS.validate("unipc", steps=5, schedule=base), 1)
    assert error(tuned(c), 1) < 0.7 * before


def test_tune_steps_writes_a_section_that_sample_and_recipes_read(tiny_ckpt, capsys, tmp_path):
    """st tune-steps: the table, a YAML sampler section (times from T to eps, steps, the
    settings given), and `st sample --sampler-file` samples on exactly those times."""
    import json

    out = tmp_path / "grid.yaml"
    code, text, err = conftest.st(capsys, "tune-steps", tiny_ckpt, "--steps", 4, "--setting",
                                  "order=2", "--calib", 4, "--check", 3, "--budget", 6,
                                  "--ref-tol", 1e-3, "--out", out)
    assert code == 0, err
    assert "tuned" in text and "4 calibration draws" in text and "3 other draws" in text
    section = yaml.safe_load(out.read_text())
    assert section["name"] == "unipc" and section["order"] == 2 and section["steps"] == 4
    assert len(section["times"]) == 5 and section["times"][0] == 1.0 and section["times"][-1] == 1e-5
    assert out.read_text().startswith("# st tune-steps")
    code, _, err = conftest.st(capsys, "sample", tiny_ckpt, "-n", 2, "--out", tmp_path / "s",
                               "--sampler-file", out, "--no-denoise")
    assert code == 0, err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["sampler"]["times"] == section["times"]
    assert manifest["sampler"]["denoise"] is False  # the option over the file
    from stcli.components.recipe import Recipe

    recipe = Recipe.model_validate({**conftest.TINY, "sample": section})
    assert recipe.sample.times == section["times"]


@pytest.mark.parametrize("argv, message", [
    (["--sampler", "pc"], "--sampler"),
    (["--setting", "order"], "not of the form KEY=VALUE"),
    (["--setting", "order=7"], "sampler.order: Input should be less than or equal to 3"),
    (["--setting", "snr=0.1"], "has no option snr"),
    (["--setting", "order=2", "--setting", "order=3"], "order is given twice"),
    (["--steps", "1"], "--steps must be at least 2"),
])
def test_tune_steps_refuses_bad_input(tiny_ckpt, capsys, tmp_path, argv, message):
    code, out, err = conftest.st(capsys, "tune-steps", tiny_ckpt, "--out", tmp_path / "g.yaml", *argv)
    assert code == 2 and message in out + err and not (tmp_path / "g.yaml").exists()


def test_sampler_file_refusals(tiny_ckpt, capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    for text, message in [("[1, 2]", "must hold a sampler section"), ("name: [", "is not YAML"),
                          ("name: unipc\norder: 1\ntimes: [1.0, 0.5, 0.001]\n", "the last time is 0.001")]:
        bad.write_text(text)
        code, out, err = conftest.st(capsys, "sample", tiny_ckpt, "-n", 1, "--out",
                                     tmp_path / "s", "--sampler-file", bad)
        assert code == 2 and message in out + err, (text, out + err)
        assert not (tmp_path / "s").exists()


def test_sampler_file_times_and_options(tiny_ckpt, capsys, tmp_path):
    """A file with explicit times refuses options that would change its grid; a hand-written
    file with times only replaces the recipe's own steps (no "steps is 5" clash)."""
    import json

    grid = tmp_path / "grid.yaml"
    grid.write_text("name: euler_maruyama\ntimes: [1.0, 0.5, 0.1, 1.0e-5]\n")  # the recipe's sampler
    code, out, err = conftest.st(capsys, "sample", tiny_ckpt, "-n", 1, "--out", tmp_path / "s",
                                 "--sampler-file", grid)
    assert code == 0, out + err
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["sampler"]["steps"] == 3 and manifest["sampler"]["times"][1] == 0.5
    assert "schedule" not in out  # the grid is the times
    for option in (["--steps", 7], ["--schedule", "edm"], ["--sampler", "heun"]):
        code, out, err = conftest.st(capsys, "sample", tiny_ckpt, "-n", 1, "--out", tmp_path / "t",
                                     "--sampler-file", grid, *option)
        assert code == 2 and f"{option[0]}" in out + err and "would change it" in out + err
    assert not (tmp_path / "t").exists()


def test_tune_steps_refuses_settings_it_sets(tiny_ckpt, capsys, tmp_path):
    for setting in ("denoise=true", "steps=4", "schedule=edm", "times=[1, 0.1]"):
        code, out, err = conftest.st(capsys, "tune-steps", tiny_ckpt, "--out", tmp_path / "g.yaml",
                                     "--setting", setting)
        assert code == 2 and "cannot be a --setting" in out + err, setting
    code, out, err = conftest.st(capsys, "tune-steps", tiny_ckpt, "--out", tmp_path / "g.yaml",
                                 "--ref-tol", 0)
    assert code == 2 and "--ref-tol positive" in out + err


def test_steps_beside_times_must_be_a_number():
    with pytest.raises(UserError, match="steps: '2' is text, not a number"):
        SAMPLERS.validate("dpm2m", times=[1.0, 0.5, 1e-5], steps="2")


def test_unipc_without_an_order_keeps_the_better_of_orders_2_and_3(tiny_ckpt, tmp_path):
    """Both orders are searched where the steps reach them; the file holds the one with the lower
    calibration error, and the rows say so."""
    from stcli.jobs.tune import TuneOptions, tune_steps

    opts = dict(calib=4, check=2, budget=4, ref_tol=1e-3, device="cpu")
    result = tune_steps(tiny_ckpt, TuneOptions(steps=5, **opts))
    tuned = {r["grid"].split(",")[0]: r["calib_rmse"] for r in result["rows"] if "tuned" in r["grid"]}
    assert set(tuned) == {"order 2", "order 3"}
    assert tuned[f"order {result['sampler']['order']}"] == min(tuned.values())
    only = tune_steps(tiny_ckpt, TuneOptions(steps=4, **opts))  # order 3 needs 5 steps
    assert only["sampler"]["order"] == 2 and not any("order" in r["grid"] for r in only["rows"])


def test_unset_times_leave_dumps_as_they_were():
    """Recipes, checkpoints and sample manifests without explicit times have no `times` key, so
    files written before the field existed compare equal to today's."""
    assert "times" not in SAMPLERS.validate("dpm2m").model_dump()
    assert SAMPLERS.validate("dpm2m", times=[1.0, 0.1, 1e-5]).model_dump()["times"] == [1.0, 0.1, 1e-5]
