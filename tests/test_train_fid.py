"""FID during training (train.eval_every): the EMA model's samples sharded across two real gloo
processes give the one-process numbers; the results reach every logger; a run that cannot
evaluate is refused before anything is written."""

import json

from conftest import run_two, st
from faults_util import csv_and_tensorboard_steps

EVAL = {"ref": "digits-train", "train_n": 24, "extractor": "st-random-64", "kid": True,
        "train_sampler": {"name": "heun", "steps": 2}, "batch_size": 8}


def fid_records(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "fid", "kid_mean")} for r in rows if "fid" in r]


def test_two_processes_measure_what_one_process_measures_and_every_logger_has_it(
        tiny_recipe, tmp_path, monkeypatch):
    """Two gloo processes train and evaluate (each draws half of the images); the FID logged
    at the last step equals a one-process evaluation of the final checkpoint's EMA weights."""
    import csv

    import torch

    from stcli.components.loading import load_model
    from stcli.infra import distributed
    from stcli.jobs.train_fid import TrainingFID

    monkeypatch.setenv("ST_FID_CACHE", str(tmp_path / "cache"))
    path = tiny_recipe("p2", train={"steps": 4, "eval_every": 2, "log_every": 4,
                                    "log": ["csv", "tensorboard"]}, eval={"fid": EVAL})
    res = run_two("train", path)
    assert res.returncode == 0, res.stderr
    run = tmp_path / "p2"
    logged = fid_records(run)
    assert [r["step"] for r in logged] == [2, 4] and all(r["fid"] > 0 for r in logged)
    loaded = load_model(run / "ckpt.safetensors")
    again = TrainingFID.prepare(loaded.recipe, distributed.Context(0, 1, torch.device("cpu")))
    alone = again(loaded.model, 4)
    assert abs(alone["fid"] - logged[-1]["fid"]) <= 1e-6 * logged[-1]["fid"]
    assert abs(alone["kid_mean"] - logged[-1]["kid_mean"]) <= 1e-6 * abs(logged[-1]["kid_mean"]) + 1e-9
    with open(run / "log.csv", newline="") as f:
        csv_fid = {int(row["step"]): float(row["fid"]) for row in csv.DictReader(f) if row["fid"]}
    assert csv_fid == {r["step"]: r["fid"] for r in logged}
    assert csv_and_tensorboard_steps(run, tag="fid")[1] == [2, 4]


def test_a_run_that_cannot_evaluate_is_refused_before_training(tiny_recipe, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setenv("ST_INCEPTION_WEIGHTS", str(tmp_path / "no-such-weights.pth"))
    cases = {
        "no reference": ({**EVAL, "ref": None}, "train.eval_every needs eval.fid.ref"),
        "no Inception weights": ({**EVAL, "extractor": "inception-v3-compat"},
                                 "no-such-weights.pth does not exist"),
        "a sampler option that does not exist": ({**EVAL, "train_sampler": {"name": "heun", "snr": 1}},
                                                 "has no option snr"),
    }
    for case, (fid, message) in cases.items():
        path = tiny_recipe("run", train={"steps": 4, "eval_every": 2}, eval={"fid": fid})
        code, out, err = st(capsys, "train", path)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (case, err)
        assert not (tmp_path / "run").exists(), case
