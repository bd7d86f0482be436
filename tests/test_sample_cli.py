"""`st sample` end to end on a checkpoint of the tiny recipe: files, grid, resume, per-image
seeds across batch sizes and processes, npz, and the bad-input messages."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_two, st
from faults_util import damaged, raw

import stcli.jobs.sample as sample_mod
from stcli.components.loading import load_model
from stcli.infra.distributed import Context
from stcli.jobs.cli import main
from stcli.jobs.sample import Job, generate, image_path, resolve_sampler

PC = {"name": "pc", "steps": 4}


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt) -> Path:
    return tiny_ckpt


def pngs(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("0*/*.png"))}


def test_image_i_is_bit_identical_for_batch_sizes_1_and_7(ckpt, tmp_path):
    loaded = load_model(ckpt, device="cpu")
    for overrides in ({}, PC, {"name": "ode", "rtol": 1e-3}, {"name": "heun", "steps": 3}):
        job = Job(loaded, resolve_sampler(loaded.recipe.sample, overrides),
                  Context(0, 1, torch.device("cpu")), tmp_path, 7, 7, 5, "png", "fp32")
        together, _ = job.sample(list(range(7)))
        alone = torch.cat([job.sample([i])[0] for i in range(7)])
        assert torch.equal(together, alone), overrides  # float outputs, not only pixels
    a = generate(ckpt, 7, tmp_path / "b1", sampler=PC, batch_size=1, device="cpu")
    b = generate(ckpt, 7, tmp_path / "b7", sampler=PC, batch_size=7, device="cpu")
    assert pngs(a) == pngs(b) and len(pngs(a)) == 7


def test_layout_grid_and_resume_after_a_crash(ckpt, tmp_path, monkeypatch):
    full = generate(ckpt, 9, tmp_path / "full", sampler=PC, batch_size=2, device="cpu")
    assert sorted(pngs(full)) == [f"000000/{i:06d}.png" for i in range(9)]
    assert (full / "grid.png").is_file() and image_path(full, 1234).parts[-2:] == ("001000", "001234.png")
    real, written = sample_mod.write_png, []

    def crash_after_four(array, path):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(path.name)
        real(array, path)

    monkeypatch.setattr(sample_mod, "write_png", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        generate(ckpt, 9, tmp_path / "part", sampler=PC, batch_size=2, device="cpu")
    assert len(pngs(tmp_path / "part")) == 4 and not list((tmp_path / "part").rglob("*.tmp"))
    assert (tmp_path / "part" / "manifest.json").is_file()  # written before the first image
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "part").glob("0*/*.png")}
    written.clear()
    monkeypatch.setattr(sample_mod, "write_png", lambda a, p: (written.append(p.name), real(a, p)))
    generate(ckpt, 9, tmp_path / "part", sampler=PC, batch_size=2, device="cpu")
    assert sorted(written) == [f"{i:06d}.png" for i in range(4, 9)]  # exactly the missing ones
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert pngs(tmp_path / "part") == pngs(full)


def test_npz_holds_the_same_images(ckpt, tmp_path):
    png = generate(ckpt, 5, tmp_path / "png", batch_size=2, device="cpu")
    npz = generate(ckpt, 5, tmp_path / "npz", batch_size=3, device="cpu", fmt="npz")
    with np.load(npz / "samples.npz") as f:
        images = f["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
    from PIL import Image

    for i in range(5):
        assert np.array_equal(np.asarray(Image.open(image_path(png, i))), images[i, ..., 0])
    assert (npz / "grid.png").is_file() and not list(npz.glob(".part-*"))


def test_two_gloo_processes_write_the_same_images_as_one(ckpt, tmp_path):
    res = run_two("sample", ckpt, "-n", 5, "--out", tmp_path / "two",
                  "--batch-size", 2, "--sampler", "pc", "--steps", 4, "--device", "cpu")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 process(es)" in res.stdout and "total NFE" in res.stdout
    one = generate(ckpt, 5, tmp_path / "one", sampler=PC, batch_size=1, device="cpu")
    assert pngs(tmp_path / "two") == pngs(one) and len(pngs(one)) == 5
    assert (tmp_path / "two" / "grid.png").is_file()


def test_cli_writes_a_grid_and_reports_nfe(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(ckpt), "-n", "4", "--out", str(tmp_path / "s"), "--sampler", "heun",
              "--steps", "2", "--no-denoise", "--device", "cpu"])
    assert exit_.value.code in (0, None)
    out = capsys.readouterr().out
    assert "total NFE 4 " in out and "images/s" in out  # heun: 2 NFE per step, no denoising
    assert "with heun (4 NFE per image)" in out  # said before the first evaluation
    from PIL import Image

    assert Image.open(tmp_path / "s" / "grid.png").size == (102, 102)  # 2x2 grid of 8px x 6 + padding


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"), ("corrupt", "corrupt or truncated"),
    ("sampler", "Invalid value for '--sampler'"),
    ("order", "dpm2m is a two-step method: steps must be at least 2, not 1"),
    ("n", "-n must be positive, got 0"), ("outfile", "exists and is not a folder"),
    ("option", "sampler 'ode' has no option steps")])
def test_bad_input_is_one_message_and_exit_code_2(ckpt, tmp_path, capsys, case, message):
    path, n, out, extra = ckpt, "3", tmp_path / "out", []
    if case == "missing":
        path = tmp_path / "nope.safetensors"
    elif case == "corrupt":
        path = tmp_path / "cut.safetensors"
        path.write_bytes(ckpt.read_bytes()[:1000])
    elif case == "sampler":
        extra = ["--sampler", "dpm"]
    elif case == "n":
        n = "0"
    elif case == "order":
        extra = ["--sampler", "dpm2m", "--steps", "1"]
    elif case == "outfile":
        out.write_text("x")
    else:
        extra = ["--sampler", "ode", "--steps", "10"]
    with pytest.raises(SystemExit) as exit_:
        main(["sample", str(path), "-n", n, "--out", str(out), "--device", "cpu", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    assert "Traceback" not in err and (case == "sampler" or len(err.strip().splitlines()) == 1)


def test_a_folder_of_other_samples_is_refused_naming_the_field(ckpt, tmp_path, capsys):
    out = generate(ckpt, 3, tmp_path / "s", sampler=PC, batch_size=3, device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert (manifest["seed"], manifest["count"], manifest["weights"], manifest["sampler"]["steps"],
            manifest["checkpoint_step"]) == (0, 3, "ema", 4, 2)
    before = pngs(out)
    tensors, _ = raw(ckpt)  # another checkpoint: the same one with other weights
    key = sorted(tensors)[0]
    other = damaged(ckpt, tmp_path / "other.safetensors", tensors={key: tensors[key] + 1})
    base = ["sample", str(ckpt), "-n", "3", "--out", str(out), "--device", "cpu",
            "--sampler", "pc", "--steps", "4"]
    for extra, field in [(["--seed", "5"], "seed (0 there, 5 requested)"),
                         (["--steps", "3"], "sampler.steps (4 there, 3 requested)"),
                         (["--weights", "raw"], "weights ('ema' there, 'raw' requested)"),
                         (["-n", "2"], "count (3 there, 2 requested)"),
                         (["-n", "4", "--format", "npz"], "count (3 there, 4 requested)"),
                         (["CKPT"], "checkpoint_sha256")]:
        args = [*base, *extra] if extra != ["CKPT"] else [base[0], str(other), *base[2:]]
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"holds samples made with another {field}" in err, err
        assert "Traceback" not in err and pngs(out) == before
    # more PNGs of the same draw extend the folder: the first 3 kept, the new ones what a fresh
    # run of 5 draws (image i depends on the seed and i only)
    with pytest.raises(SystemExit) as exit_:
        main([*base[:2], "-n", "5", *base[4:]])
    assert exit_.value.code in (0, None), capsys.readouterr().err
    grown, fresh5 = pngs(out), pngs(generate(ckpt, 5, tmp_path / "f5", sampler=PC, device="cpu"))
    assert {k: grown[k] for k in before} == before and grown == fresh5 and len(grown) == 5
    assert json.loads((out / "manifest.json").read_text())["count"] == 5
    before = grown
    (out / "manifest.json").unlink()  # samples of unknown origin
    with pytest.raises(SystemExit) as exit_:
        main(base)
    assert exit_.value.code == 2 and "without a manifest" in capsys.readouterr().err
    # --overwrite starts afresh: the folder then holds exactly what a fresh run writes
    (out / "stray.txt").write_text("not st's")
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--seed", "5", "--overwrite"])
    assert exit_.value.code in (0, None)
    fresh = generate(ckpt, 3, tmp_path / "fresh", sampler=PC, seed=5, device="cpu")
    assert pngs(out) == pngs(fresh) and pngs(out) != before
    assert json.loads((out / "manifest.json").read_text())["seed"] == 5
    assert (out / "stray.txt").is_file()  # --overwrite deletes only what st sample writes


def test_a_run_that_fails_before_its_first_image_leaves_no_manifest(tiny_ckpt, tmp_path, capsys):
    """An ode out of steps failed with a traceback and left manifest.json, which then refused
    the next run with other settings ("holds samples made with another sampler...")."""
    spec = tmp_path / "ode.yaml"
    spec.write_text("name: ode\nmax_steps: 3\n")
    out = tmp_path / "s"
    code, _, err = st(capsys, "sample", tiny_ckpt, "-n", "2", "--out", out, "--sampler-file", spec,
                      "--device", "cpu")
    assert code == 2 and "Traceback" not in err and "raise max_steps" in err, err
    assert not (out / "manifest.json").exists()
    code, _, err = st(capsys, "sample", tiny_ckpt, "-n", "2", "--out", out, "--sampler", "euler",
                      "--steps", "3", "--device", "cpu")
    assert code == 0, err


def test_progress_is_never_silent_inside_a_batch(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """Without a terminal, a long batch still prints lines: the evaluation count and the time t
    reached (here every line is due: the interval is set to 0)."""
    from stcli.infra import console

    monkeypatch.setattr(console, "PLAIN_EVERY_S", 0)
    code, out, err = st(capsys, "sample", tiny_ckpt, "-n", "3", "--out", tmp_path / "s",
                        "--sampler", "euler", "--steps", "4", "--device", "cpu")
    assert code == 0, err
    beats = [line for line in out.splitlines() if "now NFE" in line]
    counts = [line.split("now NFE ")[1].split()[0] for line in beats]
    assert counts == ["1/5", "2/5", "3/5", "4/5", "5/5"]  # a fixed grid: of how many, and the ETA
    assert all("batch eta 0:0" in line for line in beats[1:])
    code, out, err = st(capsys, "nll", tiny_ckpt, "--limit", "2", "--rtol", "1e-2", "--atol", "1e-2",
                        "--device", "cpu")
    assert code == 0, err
    assert sum("now NFE" in line for line in out.splitlines()) >= 10 and " at t 1" in out


def test_a_sampler_other_than_the_recipes_keeps_its_own_defaults(tiny_ckpt, tmp_path, capsys):
    """The recipe's sampler settings (euler_maruyama, 5 steps on the uniform grid) do not leak
    into another sampler: dpm2m runs its own 20 steps on the EDM grid; the line printed and the
    manifest say where each setting came from."""
    code, out, err = st(capsys, "sample", tiny_ckpt, "-n", "2", "--out", tmp_path / "a",
                        "--sampler", "dpm2m", "--device", "cpu")
    assert code == 0, err
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["sampler"]["steps"] == 20 and manifest["sampler"]["schedule"] == "edm"
    assert manifest["sampler_from"] == {"steps": "default", "schedule": "default", "rho": "default",
                                        "times": "default", "denoise": "default"}
    assert 'sampler dpm2m: denoise true (default), steps 20 (default), schedule "edm" (default)' in out
    code, out, err = st(capsys, "sample", tiny_ckpt, "-n", "2", "--out", tmp_path / "b",
                        "--sampler", "heun", "--steps", "3", "--schedule", "log_snr", "--device", "cpu")
    assert code == 0, err
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["sampler"]["steps"], manifest["sampler"]["schedule"]) == (3, "log_snr")
    assert manifest["sampler_from"]["steps"] == manifest["sampler_from"]["schedule"] == "option"
    code, out, err = st(capsys, "sample", tiny_ckpt, "-n", "2", "--out", tmp_path / "c", "--device", "cpu")
    assert code == 0, err
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["sampler"]["name"] == "euler_maruyama" and manifest["sampler"]["steps"] == 5
    assert set(manifest["sampler_from"].values()) == {"recipe"}
