"""benchmarks/repro: every recipe variant builds (`--quick --dry-run`), and the formulas of the
reproduction (MMD to a Gaussian mixture, the digit-classifier FID, mean ± s.e. tables) against
independent references."""

import math
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import ROOT
from scipy.stats import multivariate_normal

from stcli.components.recipe import load_recipe

sys.path.insert(0, str(ROOT / "benchmarks" / "repro"))
import convergence  # noqa: E402
import digits_fid  # noqa: E402
import gmm_mmd  # noqa: E402
import report  # noqa: E402
import run  # noqa: E402
import until_converged  # noqa: E402
from variants import DATASETS, TABLE4, TABLE5, TABLE7, Plan  # noqa: E402

MEANS = torch.tensor([[0.0, 0.0], [1.5, -0.5], [-1.0, 2.0]], dtype=torch.float64)
STD, WEIGHTS = 0.3, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
GMM = (MEANS, STD, WEIGHTS)


def gmm_samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return MEANS[k] + STD * torch.randn(n, 2, generator=g, dtype=torch.float64)


def test_quick_dry_run_builds_every_variant(tmp_path, capsys):
    out = run.main(["--quick", "--dry-run", "--extras", "--out", str(tmp_path)])
    keys = {v.key for v in TABLE4 + TABLE5 + TABLE7}
    n_digits, n_toy2d = len(TABLE4 + TABLE5 + TABLE7[1:]), len(TABLE4 + TABLE5 + TABLE7)
    assert len(out["built"]) == 2 * n_digits + 2 * n_toy2d
    assert all(any(f"{k}_s" in c for c in out["built"]) for k in keys)
    assert "30 jobs built" in capsys.readouterr().out
    assert len(Plan(True, tmp_path).jobs) == 4 * len(TABLE4 + TABLE5)  # no extras
    stf = run.main(["--quick", "--dry-run", "--data", "toy2d_stf", "--out", str(tmp_path)])
    assert len(stf["built"]) == 8 and sum("name: stf" in c for c in stf["built"]) == 4
    sweep = run.main(["--quick", "--dry-run", "--data", "toy2d_eps", "--out", str(tmp_path)])
    assert len(sweep["built"]) == 16
    assert all(sum(f"eps: {eps}" in c for c in sweep["built"]) == 4 for eps in (0.01, 1e-05))
    part = run.main(["--quick", "--dry-run", "--extras", "--data", "toy2d", "--losses", "st_P0",
                     "st_P2", "--out", str(tmp_path)])  # a part of the plan: Table 7's extras alone
    assert len(part["built"]) == 4 and all("st_P0_s" in c or "st_P2_s" in c for c in part["built"])
    with pytest.raises(SystemExit):
        run.parse(["--losses", "no_such_loss"])
    full = Plan(False, tmp_path)  # the full plan: >= 3 seeds, every recipe valid
    assert all(len(d.full.seeds) >= 3 for d in DATASETS.values())
    for job in full.jobs:
        recipe = job.recipe()
        assert recipe.train.steps == job.budget.steps and recipe.seed == job.seed


def test_variants_set_the_papers_losses(tmp_path):
    jobs = {j.variant.key: j.recipe() for j in Plan(True, tmp_path, ("digits",)).jobs}
    assert jobs["g2"].truncation.name == "hard" and jobs["g2"].loss.weighting == "likelihood"
    assert jobs["var"].loss.weighting == "variance" and jobs["var"].loss.time_sampling == "uniform"
    assert jobs["g2P1"].loss.weighting_P.k == 1.0 and jobs["g2P1"].truncation.name == "hard"
    assert jobs["st_P0.9"].truncation.k == 0.9 and jobs["st_P1"].truncation.k == 1.0
    assert jobs["var_st_P1"].truncation.k == 1.0 and jobs["var_st_P1"].loss.weighting == "variance"


def test_paper_settings_and_seed_major_order(tmp_path):
    """VP reduced by the mean, digits not dequantised in training, the recipes' EMA with warm-up,
    EMA snapshots for the curves; the first seed of every loss runs before the second."""
    plan = Plan(False, tmp_path)
    for job in plan.jobs:
        r = job.recipe()
        base = load_recipe(ROOT / job.data.recipe)
        assert r.loss.reduce == "mean" and r.train.ema_warmup and r.train.ema == base.train.ema
        assert r.train.snapshot_every > 0 and r.train.snapshot_weights == "ema"
        assert r.truncation.eps == 1e-5
        if job.data.key == "digits":
            assert r.data.dequantization == "none"
    digits = [j for j in plan.jobs if j.data.key == "digits"]
    assert [j.seed for j in digits] == sorted(j.seed for j in digits)
    assert {j.curve_steps != () for j in digits} == {True, False}
    assert all(j.curve_steps == () for j in digits if j.seed != 0)
    short = Plan(False, tmp_path, ("toy2d_eps",)).jobs[0].recipe()  # the documented short runs
    assert short.loss.reduce == "sum" and short.train.ema == 0.99 and not short.train.ema_warmup


def _point(step, nelbo_shift, q, q_se=0.1, n=50):
    items = (np.linspace(0.0, 1.0, n) + nelbo_shift).tolist()
    return {"step": step, "nelbo_items": items, "nll": {"mean": float(np.mean(items))},
            "nelbo": {"mean": float(np.mean(items)),
            "stderr": float(np.std(items, ddof=1) / np.sqrt(n))}, "fid": q, "fid_se": q_se}


def test_convergence_criterion_takes_the_first_snapshot_nothing_later_beats():
    shifts, fids = [1.0, 0.5, 0.2, 0.03, 0.0, 0.0, 0.0], [9.0, 5.0, 3.0, 2.9, 3.0, 3.05, 2.95]
    points = [_point(100 * (i + 1), s, f) for i, (s, f) in enumerate(zip(shifts, fids))]
    # the NELBO's s.e. over items is 0.041: a later drop of 0.03 is within it ("item"), but the
    # items move together, so the paired difference's s.e. is 0 and any drop counts ("paired")
    assert convergence.converged_at(points, "fid", tol="item")["step"] == 400
    assert convergence.converged_at(points, "fid", tol="paired")["step"] == 500
    points[-1]["fid"] = 2.0  # an FID drop of 0.95 > 2 x hypot(0.1, 0.1) at the last snapshot
    assert convergence.converged_at(points, "fid", tol="paired")["step"] is None
    mean, se = convergence.paired_se([1.0, 2.0, 3.0], [0.5, 1.0, 2.0])
    assert mean == pytest.approx(-5 / 6) and se == pytest.approx(np.std([-0.5, -1, -1], ddof=1) / np.sqrt(3))


def test_resolution_criterion_needs_a_longer_window_and_a_drop_that_matters():
    """tol="resolution": a NELBO drop counts if it exceeds delta (and 2 paired s.e.); the verdict
    waits for a snapshot at window x s."""
    shifts = [1.0, 0.5, 0.2, 0.19, 0.185, 0.185, 0.182]  # items move together: paired s.e. 0
    points = [_point(1000 * (i + 1), s, 3.0) for i, s in enumerate(shifts)]
    criterion = dict(tol="resolution", delta=0.02, window=1.5)
    assert convergence.converged_at(points, "fid", **criterion)["step"] == 3000  # later drops <= 0.02
    assert convergence.converged_at(points[:4], "fid", **criterion)["step"] is None  # 4000 < 1.5 x 3000
    assert convergence.converged_at(points, "fid", **{**criterion, "delta": 0.001})["step"] is None
    assert [until_converged.next_stop(s, 1000) for s in (0, 3000, 4000, 8000, 12000)] == \
        [1000, 4000, 5000, 10000, 15000]


def test_mmd_data_terms_match_monte_carlo():
    y, y2 = gmm_samples(200000, 1), gmm_samples(200000, 2)
    x = torch.tensor([[0.1, 0.2], [2.0, 0.0], [-1.0, 1.5]], dtype=torch.float64)
    for h in (0.2, 1.0):
        k = torch.exp(-torch.cdist(x, y).pow(2) / (2 * h**2))
        assert torch.allclose(gmm_mmd.data_kernel_mean(x, *GMM, h), k.mean(1), atol=3e-3)
        kyy = torch.exp(-(y - y2).pow(2).sum(1) / (2 * h**2))
        se = float(kyy.std()) / math.sqrt(len(kyy))
        assert abs(gmm_mmd.data_data_kernel_mean(*GMM, h) - float(kyy.mean())) < 4 * se


def test_mmd_is_zero_for_data_and_positive_for_wrong_samples():
    data = gmm_samples(3000, 3)
    wrong = data * 1.3  # modes too far apart and too wide
    for h in (0.2, 1.0):
        assert abs(gmm_mmd.mmd2(data, GMM, h)) < 2e-3
        assert gmm_mmd.mmd2(wrong, GMM, h) > 1e-2
    x = gmm_samples(7, 4)  # the U-statistic: mean of k over the n(n-1) off-diagonal pairs
    k = torch.exp(-torch.cdist(x, x).pow(2) / 2)
    assert math.isclose(gmm_mmd.sample_kernel_mean(x, 1.0, chunk=3),
                        float((k.sum() - 7) / 42), rel_tol=1e-12)


def test_mmd_block_standard_error_matches_the_spread_over_independent_draws():
    wrong = [gmm_samples(800, 10 + i) * 1.1 for i in range(30)]
    spread = np.std([gmm_mmd.mmd2(x, GMM, 0.5) for x in wrong], ddof=1)
    se = np.mean([gmm_mmd.mmd2_block_se(x, GMM, 0.5) for x in wrong])
    assert 0.5 < se / spread < 2.0


def test_mixture_log_density_matches_scipy():
    x = gmm_samples(5, 5)
    expected = np.log(sum(w * multivariate_normal(m.numpy(), STD**2 * np.eye(2)).pdf(x.numpy())
                          for m, w in zip(MEANS, WEIGHTS.numpy())))
    assert np.allclose(gmm_mmd.data_logp(x, GMM).numpy(), expected, rtol=1e-10)


def test_digit_fid_is_torch_fidelitys_frechet_distance_of_registered_features():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    assert FEATURE_EXTRACTORS_REGISTRY[digits_fid.NAME] is digits_fid.DigitFeatures
    ext = digits_fid.extractor(None)  # untrained: the shapes and the registry are what matter
    images, labels = digits_fid.digit_split("test")
    assert digits_fid.features(images, ext).shape == (297, 64) and len(labels) == 297
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = torch.randn(400, 8, generator=g, dtype=torch.float64) @ mix
    b = 0.5 + torch.randn(300, 8, generator=g, dtype=torch.float64) @ mix.T
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert math.isclose(digits_fid.fid(a, b), expected, rel_tol=1e-8)
    assert abs(digits_fid.fid(a, a)) < 1e-8
    draws = [torch.randn(400, 8, generator=g, dtype=torch.float64) @ mix for _ in range(30)]
    spread = np.std([digits_fid.fid(x, b) for x in draws], ddof=1)  # FID over independent samples
    boot = np.mean([digits_fid.fid_bootstrap_se(x, b, n=40) for x in draws[:5]])
    assert 0.5 < boot / spread < 2.0


def test_classifier_training_is_deterministic(tmp_path):
    first = digits_fid.train_classifier(tmp_path / "a.safetensors", epochs=1)
    second = digits_fid.train_classifier(tmp_path / "b.safetensors", epochs=1)
    assert first == second and first["test_accuracy"] > 0.5
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def _result(variant, seed, nll, fid):
    return {"data": "digits", "variant": variant, "label": variant, "seed": seed,
            "nll": {"mean": nll}, "nelbo": {"mean": nll + 0.1}, "fid": fid, "fid_em": fid + 1,
            "train_s": 1.0, "eval_s": 2.0, "recipe": {"train": {"steps": 3000}}}


def test_tables_mean_standard_error_and_paired_differences():
    runs = [_result("g2", s, n, f) for s, n, f in ((0, 3.0, 10.0), (1, 3.2, 14.0), (2, 3.1, 12.0))]
    runs += [_result("st_P1", s, n, f) for s, n, f in ((0, 3.0, 8.0), (1, 3.1, 11.0), (2, 3.2, 8.0))]
    rows = {r["variant"]: r for r in report.aggregate(runs)["digits"]}
    assert rows["g2"]["fid"]["mean"] == pytest.approx(12.0)
    assert rows["g2"]["fid"]["se"] == pytest.approx(np.std([10, 14, 12], ddof=1) / np.sqrt(3))
    runs += [_result("g2P1", s, n, f) for s, n, f in ((0, 3.1, 9.0), (2, 3.3, 10.0))]
    diff, _, other = report.paired(runs)["digits"]  # st_P1 and g2P1 − g2, then st_P1 − g2P1
    assert diff["fid"]["mean"] == pytest.approx(-3.0)
    assert diff["fid"]["se"] == pytest.approx(np.std([-2, -3, -4], ddof=1) / np.sqrt(3))
    assert (other["variant"], other["base"], other["seeds"]) == ("st_P1", "g2P1", [0, 2])
    assert other["fid"]["mean"] == pytest.approx(-1.5)  # seeds 0, 2: 8 - 9, 8 - 10
    assert "| st_P1 − g2P1 (0,2) | " in report.paired_markdown([other], "digits")
    table = report.markdown(report.aggregate(runs)["digits"], "digits")
    assert "12.00 ± 1.15" in table and "| g2 | 3,000 (0,1,2) |" in table


def test_an_interrupted_job_resumes_whatever_its_path_was_spelled(tiny_recipe, tmp_path, monkeypatch):
    """The study's driver deleted two 15,000-step runs because the checkpoint's recipe named its
    folder relative and the restarted driver absolute: the folder is the job's own, so only the
    rest of the recipe decides whether it resumes."""
    import evaluate

    from stcli.components.recipe import load_recipe
    from stcli.jobs.train import train

    monkeypatch.chdir(tmp_path)
    path = tiny_recipe("job", train={"steps": 2, "out_dir": "job"})
    train(load_recipe(path))
    absolute = load_recipe(path, [f"train.out_dir={tmp_path / 'job'}"])
    assert evaluate._resumable(tmp_path / "job", absolute)
    assert evaluate._resumable(tmp_path / "job", load_recipe(path, ["train.steps=5"]))  # continues
    assert not evaluate._resumable(tmp_path / "job", load_recipe(path, ["train.steps=1"]))  # past it
    assert not evaluate._resumable(tmp_path / "job", load_recipe(path, ["seed=9"]))
