"""`st nll` end to end on a tiny checkpoint: numbers, JSON, two gloo processes, bad input."""

import json

import pytest
import torch
from conftest import run_two, st

from stcli.infra import checkpoint

FAST = ["--limit", "6", "--batch-size", "4", "--rtol", "1e-3", "--atol", "1e-3"]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt




def test_nll_and_nelbo_with_json(ckpt, tmp_path, capsys):
    code, out, err = st(capsys, "nll", ckpt, *FAST, "--nelbo", "--repeats", "2",
                        "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "nll_after" in out and "nelbo_residual" in out
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["settings"]["correction"] == "after" and res["settings"]["repeats"] == 2
    assert len(res["per_sample_bpd"]["nll_after"]) == 12  # 6 items x 2 repeats
    assert set(res["summary"]) == {"nll_after", "nelbo", "nelbo_residual"}
    assert 0 < res["summary"]["nll_after"]["mean"] < 50 and res["summary"]["nll_after"]["stderr"] > 0
    assert len(res["nfe_per_batch"]) == 4 and min(res["nfe_per_batch"]) > 5
    # the standard error is over the 6 images, their 2 repeats averaged first (rows are in
    # (repeat, image) order): repeats of one image are not independent draws of the data
    rows = res["per_sample_bpd"]["nll_after"]
    per_image = [(rows[i] + rows[6 + i]) / 2 for i in range(6)]
    mean = sum(per_image) / 6
    se = (sum((v - mean) ** 2 for v in per_image) / 5) ** 0.5 / 6 ** 0.5
    summary = res["summary"]["nll_after"]
    assert summary["n"] == 6 and summary["repeats"] == 2
    assert summary["mean"] == pytest.approx(mean, rel=1e-6)
    assert summary["stderr"] == pytest.approx(se, rel=1e-5)


def test_one_image_has_no_standard_error_and_writes_strict_json(ckpt, tmp_path, capsys):
    code, out, err = st(capsys, "nll", ckpt, "--limit", "1", "--rtol", "1e-3", "--atol", "1e-3",
                        "--correction", "before", "--json", tmp_path / "r.json")
    assert code == 0, err
    assert "n/a (one image)" in out and "nan" not in out.lower()
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text
    res = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert res["summary"]["nll_before"]["stderr"] is None


def test_two_processes_give_exactly_the_one_process_numbers(ckpt, tmp_path, capsys):
    one = st(capsys, "nll", ckpt, *FAST, "--correction", "before", "--json", tmp_path / "1.json")
    two = run_two("nll", ckpt, *FAST, "--correction", "before", "--json", tmp_path / "2.json")
    assert one[0] == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("1", "2"))
    assert a["per_sample_bpd"] == b["per_sample_bpd"]
    assert a["nfe_per_batch"] == b["nfe_per_batch"]


@pytest.mark.parametrize("protocol,tol", [("paper", 1e-5), ("fast", 1e-3)])
def test_a_protocol_is_its_solver_settings(ckpt, tmp_path, capsys, protocol, tol):
    few = ["--limit", "2", "--batch-size", "2", "--correction", "before", "--solver-check", "0"]
    code, _, err = st(capsys, "nll", ckpt, *few, "--protocol", protocol, "--json", tmp_path / "p.json")
    assert code == 0, err
    code, _, err = st(capsys, "nll", ckpt, *few, "--time-variable", "t", "--rtol", str(tol),
                      "--atol", str(tol), "--error-norm", "rms", "--json", tmp_path / "t.json")
    assert code == 0, err
    named, t = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("p", "t"))
    assert named["per_sample_bpd"] == t["per_sample_bpd"] and named["nfe_per_batch"] == t["nfe_per_batch"]
    assert named["settings"]["time_variable"] == "t" and named["settings"]["rtol"] == tol


@pytest.mark.parametrize("argv,message", [
    (["--time-variable", "sigma"], "'sigma' is not one of 't', 'lambda', 'lambda_scaled'"),
    (["--protocol", "score_sde"], "'score_sde' is not one of 'default', 'paper', 'fast'"),
    (["--error-norm", "max"], "'max' is not one of 'rms', 'rms_per_part'"),
    (["--correction", "later"], "'later' is not one of 'after', 'before'"),
])
def test_bad_choices_are_usage_errors(ckpt, capsys, monkeypatch, argv, message):
    monkeypatch.setenv("COLUMNS", "200")  # the usage error's box unwrapped
    code, out, err = st(capsys, "nll", ckpt, *argv)
    assert code == 2 and message in " ".join(err.split()) and f"Invalid value for '{argv[0]}'" in err
    assert "Traceback" not in err and not out


@pytest.mark.parametrize("argv,message", [
    (["--rtol", "0"], "--rtol must be a positive number, got 0.0"),
    (["--atol", "-1e-3"], "--atol must be a positive number, got -0.001"),
    (["--protocol", "paper", "--rtol", "1e-3"], "--protocol paper fixes the solver"),
    (["--protocol", "fast", "--time-variable", "lambda"], "--protocol fast fixes the solver"),
])
def test_bad_solver_settings(ckpt, capsys, argv, message):
    code, _, err = st(capsys, "nll", ckpt, *argv)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_input(ckpt, tmp_path, capsys):
    code, _, err = st(capsys, "nll", ckpt, "--split", "validation")
    assert code == 2 and "no split 'validation'" in err
    tensors, meta = checkpoint.load(ckpt)
    checkpoint.save(tmp_path / "raw.safetensors",
                    {k: v for k, v in tensors.items() if not k.startswith("ema.")}, meta)
    code, _, err = st(capsys, "nll", tmp_path / "raw.safetensors", *FAST)
    assert code == 2 and "no ema weights" in err
    code, _, err = st(capsys, "nll", tmp_path / "missing.safetensors")
    assert code == 2 and "does not exist" in err


def test_the_solver_error_estimate_tracks_the_error_to_a_tight_solve(tiny_ckpt, capsys):
    """--solver-check: items solved again at 100x tighter tolerances estimate the solver's error
    of the mean; against a 1e-6 solve of the same items (same noise), the estimate holds most of
    the true error, and it falls with the tolerance; every report prints it."""
    from stcli.components.likelihood import bits_per_dim, nll
    from stcli.components.loading import load_model
    from stcli.infra.seeding import generator
    from stcli.jobs import nll as nll_mod

    loaded = load_model(tiny_ckpt)
    data = loaded.recipe.data.for_evaluation()
    test = data.create("test")

    def solve(tol):
        g = generator(torch.device("cpu"), 0, "nll-solver-check")
        x = data.transform(torch.stack([test[i] for i in range(4)]), g)
        vals, _ = nll(loaded.model.score, loaded.recipe.sde, x, eps=loaded.recipe.nll_eps,
                      rtol=tol, atol=tol, generator=g)
        return bits_per_dim(vals, data.dim, data.bpd_offset()).double()

    estimates = {}
    for tol in (3e-2, 3e-3):
        opts = nll_mod.NllOptions(limit=4, batch_size=4, rtol=tol, atol=tol, device="cpu",
                                  solver_check=4)
        estimates[tol] = nll_mod.evaluate(tiny_ckpt, opts).solver["mean_diff"]
    true = float((solve(3e-2) - solve(1e-6)).mean())
    assert abs(true) > 1e-4  # a loose solve errs measurably
    assert abs(estimates[3e-2] - true) <= 0.5 * abs(true)
    assert abs(estimates[3e-3]) < abs(estimates[3e-2])
    code, out, err = st(capsys, "nll", tiny_ckpt, "--limit", "2", "--rtol", "3e-2", "--atol", "3e-2",
                        "--device", "cpu")
    assert code == 0, err
    assert "solver error of the mean, estimated on 2 items" in out
