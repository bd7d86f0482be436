"""`st nll` end to end on a tiny checkpoint: numbers, JSON, two gloo processes, bad input."""

import json

import pytest
from conftest import run_st, st

from stcli import checkpoint

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


def test_two_processes_give_exactly_the_one_process_numbers(ckpt, tmp_path, capsys):
    one = st(capsys, "nll", ckpt, *FAST, "--correction", "before", "--json", tmp_path / "1.json")
    two = run_st("nll", ckpt, *FAST, "--correction", "before", "--json", tmp_path / "2.json",
                 "--procs", "2")
    assert one[0] == 0 and two.returncode == 0, two.stderr[-2000:]
    a, b = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("1", "2"))
    assert a["per_sample_bpd"] == b["per_sample_bpd"]
    assert a["nfe_per_batch"] == b["nfe_per_batch"]


def test_protocol_paper_is_dopri5_in_t_at_1e_5(ckpt, tmp_path, capsys):
    few = ["--limit", "2", "--batch-size", "2", "--correction", "before"]
    code, _, err = st(capsys, "nll", ckpt, *few, "--protocol", "paper", "--json", tmp_path / "p.json")
    assert code == 0, err
    code, _, err = st(capsys, "nll", ckpt, *few, "--time-variable", "t", "--rtol", "1e-5",
                      "--atol", "1e-5", "--error-norm", "rms", "--json", tmp_path / "t.json")
    assert code == 0, err
    paper, t = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("p", "t"))
    assert paper["per_sample_bpd"] == t["per_sample_bpd"] and paper["nfe_per_batch"] == t["nfe_per_batch"]
    assert paper["settings"]["time_variable"] == "t" and paper["settings"]["rtol"] == 1e-5


@pytest.mark.parametrize("argv,message", [
    (["--time-variable", "sigma"], "'sigma' is not one of 't', 'lambda', 'lambda_scaled'"),
    (["--protocol", "score_sde"], "'score_sde' is not one of 'default', 'paper'"),
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
