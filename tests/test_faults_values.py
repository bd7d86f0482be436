"""Every value st reads is checked where it is read, and nothing the user owns is overwritten:
one test per cause (output paths, weights, numbers, overrides, names, late outputs, sizes, the
launcher's variables).  Each refusal is exit 2 with one line naming the problem, and every file
the user had is byte-identical afterwards."""

import json
import os

import pytest
import torch
from conftest import run_st, st
from faults_util import damaged, mount_tmpfs, raw, refused, snapshot, unmount

from stcli.infra import outputs


def one_line(result) -> str:
    flat = refused(result)
    assert len(result[2].strip().splitlines()) == 1, result[2]
    return flat


# --- one writer policy --------------------------------------------------------------------------
def test_outputs_never_replace_what_the_user_owns(tiny_ckpt, tmp_path, capsys):
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes(b"the user's own file")
    fifo, folder, users = tmp_path / "pipe", tmp_path / "folder", tmp_path / "users"
    os.mkfifo(fifo)
    folder.mkdir()
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    (users / "000000.png").write_bytes(b"my picture")
    before = snapshot(tmp_path) | snapshot(tiny_ckpt.parent)
    cases = {
        "export over a file": (("export", tiny_ckpt, "--out", mine),
                               "exists; choose another file or pass --overwrite"),
        "export over a pipe": (("export", tiny_ckpt, "--out", fifo, "--overwrite"), "is not a regular file"),
        "export over its input": (("export", tiny_ckpt, "--out", tiny_ckpt, "--overwrite"),
                                  "is the command's input"),
        "export into a folder": (("export", tiny_ckpt, "--out", folder), "is a folder; name a file"),
        "nll --json over a file": (("nll", tiny_ckpt, "--json", mine, "--limit", "2"), "--json"),
        "nll --json a folder": (("nll", tiny_ckpt, "--json", folder, "--limit", "2", "--overwrite"),
                                "is a folder"),
        "fid --json a folder": (("fid", tmp_path, "--ref", tmp_path, "--json", folder), "is a folder"),
        "sample --out empty": (("sample", tiny_ckpt, "-n", "2", "--out", ""), "--out is empty"),
        "sample --out a file": (("sample", tiny_ckpt, "-n", "2", "--out", mine), "is not a folder"),
        "sample into the user's folder": (("sample", tiny_ckpt, "-n", "2", "--out", users),
                                          "holds files st sample did not write (000000.png, notes.txt)"),
    }
    for case, (args, message) in cases.items():
        flat = one_line(st(capsys, *args))
        assert message in flat, (case, flat)
    assert snapshot(tmp_path) | snapshot(tiny_ckpt.parent) == before
    assert not list(tmp_path.glob(".st-tmp-*"))


def test_import_never_replaces_its_own_input(tmp_path, capsys):
    from conftest import ROOT

    src = tmp_path / "in.pth"
    src.write_bytes((ROOT / "tests/fixtures/score_sde/score_sde_ve_ncsnpp_nf16.pth").read_bytes())
    before = src.read_bytes()
    flat = one_line(st(capsys, "import", src, "--recipe", ROOT / "recipes/cifar10_ncsnpp_ve_var.yaml",
                       "net.nf=16", "--out", src, "--overwrite"))
    assert "is the command's input" in flat and src.read_bytes() == before


def _full(path):
    raise outputs.UserError(f"no space left on the device to write {path}")


def test_a_result_that_cannot_be_written_is_printed_first(tiny_ckpt, tmp_path, capsys, monkeypatch):
    """The work is done when the write fails (a full disk, a vanished folder): the numbers are
    printed, then the error."""
    monkeypatch.setattr(outputs, "atomic", _full)
    code, out, err = st(capsys, "nll", tiny_ckpt, "--limit", "2", "--rtol", "1e-2", "--atol", "1e-2",
                        "--device", "cpu", "--json", tmp_path / "nll.json")
    assert code == 2 and "the result is printed above" in err
    printed = json.loads(out[out.index('{\n "checkpoint"'):])
    assert len(next(iter(printed["per_sample_bpd"].values()))) == 2 and not (tmp_path / "nll.json").exists()


def _fill(folder):
    """Write into `folder` until its file system is full."""
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"x" * 4096)
                f.flush()
    except OSError:
        pass


def test_diagnose_on_a_full_disk_prints_its_result(tiny_ckpt, tmp_path, capsys, monkeypatch):
    disk = tmp_path / "disk"
    mounted = mount_tmpfs(disk, 8 * 4096)
    try:
        if mounted:
            (disk / "d").mkdir()
            _fill(disk)
        else:  # not root: a write that fails as a full disk does
            monkeypatch.setattr(outputs, "atomic", _full)
        code, out, err = st(capsys, "diagnose", tiny_ckpt, "--limit", "2", "--points", "2",
                            "--samples", "4", "--tau", "0.1", "--batch-size", "4", "--device", "cpu",
                            "--out", disk / "d")
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "no space left" in err and "printed above" in err and '"integrand"' in out
    finally:
        if mounted:
            unmount(disk)


# --- the checkpoint reader: finite, float32, for every command ------------------------------------
def test_non_finite_or_mistyped_weights_are_refused_by_every_reader(tiny_ckpt, tmp_path, capsys):
    t, _ = raw(tiny_ckpt)
    ema = next(k for k in t if k.startswith("ema.") and t[k].dim() == 4)
    model = "model." + ema[4:]
    bad = {
        "nan ema": (dict(tensors={ema: torch.full_like(t[ema], float("nan"))}), f"{ema} holds"),
        "inf raw": (dict(tensors={model: t[model].clone().fill_(float("inf"))}), f"{model} holds"),
        "int32": (dict(tensors={ema: t[ema].to(torch.int32)}), "holds int32 values where st writes float32"),
        "float64": (dict(tensors={model: t[model].double()}), "holds float64 values"),
    }
    for case, (change, message) in bad.items():
        path = damaged(tiny_ckpt, tmp_path / case / "ckpt.safetensors", **change)
        for args in (("sample", path, "-n", "1", "--out", tmp_path / "s"),
                     ("sample", path, "-n", "1", "--out", tmp_path / "s", "--weights", "raw"),
                     ("export", path, "--out", tmp_path / case / "e.safetensors"),
                     ("nll", path, "--limit", "1")):
            flat = one_line(st(capsys, *args))
            assert message in flat and "damaged" in flat, (case, args, flat)
        assert not (tmp_path / "s").exists() and not (tmp_path / case / "e.safetensors").exists()


def test_a_changed_byte_in_the_weights_is_found(tiny_ckpt, tmp_path, capsys):
    """safetensors has no checksum: a flipped bit in a tensor (a disk or copy error) loaded and
    resumed silently. st writes the tensors' sha256 in the metadata and checks it on load."""
    data = bytearray(tiny_ckpt.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + (len(data) - 8 - header) // 2] ^= 0x01  # one bit in the tensor bytes
    bad = tmp_path / "run" / "ckpt.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(bytes(data))
    for args in (("sample", bad, "-n", "1", "--out", tmp_path / "s"),
                 ("export", bad, "--out", tmp_path / "e.safetensors"),
                 ("nll", bad, "--limit", "1")):
        flat = one_line(st(capsys, *args))
        assert "is damaged: its tensors differ from the checksum written with them" in flat, flat
    assert not (tmp_path / "s").exists() and not (tmp_path / "e.safetensors").exists()
    assert bad.read_bytes() == bytes(data)  # kept for inspection


def test_checkpoints_from_before_the_checksum_and_data_record_still_load_and_resume(tiny_recipe, capsys):
    path = tiny_recipe("old", train={"steps": 2})
    assert st(capsys, "train", path)[0] == 0
    ckpt = path.parent / "old" / "ckpt.safetensors"
    damaged(ckpt, ckpt, drop_meta=("tensors_sha256", "data"))  # as written before they existed
    assert "tensors_sha256" not in raw(ckpt)[1] and "data" not in raw(ckpt)[1]
    code, _, err = st(capsys, "train", path, "--resume", "train.steps=3")
    assert code == 0, err
    assert "tensors_sha256" in raw(ckpt)[1]  # the resumed run writes them


def test_an_export_is_never_labelled_with_weights_it_does_not_hold(tiny_ckpt, tmp_path, capsys):
    """An export keeps one set of weights: asking raw of an EMA export is refused (its numbers
    would be the EMA's labelled raw); a raw export is used and recorded as raw."""
    ema, rawx = tmp_path / "ema.safetensors", tmp_path / "raw.safetensors"
    assert st(capsys, "export", tiny_ckpt, "--out", ema)[0] == 0
    assert st(capsys, "export", tiny_ckpt, "--out", rawx, "--weights", "raw")[0] == 0
    for args in (("sample", ema, "-n", "1", "--out", tmp_path / "s", "--weights", "raw"),
                 ("nll", ema, "--limit", "1", "--weights", "raw", "--json", tmp_path / "n.json")):
        flat = one_line(st(capsys, *args))
        assert "holding only its ema weights; drop --weights raw" in flat, flat
    assert not (tmp_path / "s").exists() and not (tmp_path / "n.json").exists()
    code, _, err = st(capsys, "sample", rawx, "-n", "1", "--out", tmp_path / "s", "--format", "npz")
    assert code == 0, err
    assert json.loads((tmp_path / "s" / "manifest.json").read_text())["weights"] == "raw"
    code, _, err = st(capsys, "nll", rawx, "--limit", "1", "--rtol", "1e-2", "--atol", "1e-2",
                      "--solver-check", "0", "--json", tmp_path / "n.json")
    assert code == 0, err
    assert json.loads((tmp_path / "n.json").read_text())["settings"]["weights"] == "raw"


def test_export_checks_the_weights_against_the_net_as_sampling_does(tiny_ckpt, tmp_path, capsys):
    """A missing tensor, an edited shape, or a recipe naming another net: `st export` refuses
    (as `st sample` does) instead of writing a file nothing can load."""
    t, m = raw(tiny_ckpt)
    ema = next(k for k in t if k.startswith("ema.") and t[k].dim() == 4)
    recipe = json.loads(m["recipe"])
    recipe["net"]["nf"] = 2 * recipe["net"]["nf"]
    cases = {"missing": dict(drop=(ema,)), "shape": dict(tensors={ema: t[ema][:1].clone()}),
             "recipe": dict(meta={"recipe": json.dumps(recipe)})}
    for case, change in cases.items():
        path = damaged(tiny_ckpt, tmp_path / case / "ckpt.safetensors", **change)
        out = tmp_path / case / "e.safetensors"
        flat = one_line(st(capsys, "export", path, "--out", out))
        assert "does not match its recipe's net" in flat and not out.exists(), (case, flat)


def test_resume_refuses_a_mistyped_checkpoint_and_keeps_it(tiny_ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    t, _ = raw(tiny_ckpt)
    ema = next(k for k in t if k.startswith("model.") and t[k].dim() == 4)
    ckpt = damaged(tiny_ckpt, run / "ckpt.safetensors", tensors={ema: t[ema].to(torch.int32)})
    (run / "recipe.yaml").write_bytes((tiny_ckpt.parent / "recipe.yaml").read_bytes())
    before = snapshot(run)
    one_line(st(capsys, "train", run, "train.steps=5", "--resume"))
    assert snapshot(run) == before and ckpt.exists()


# --- numbers that are not numbers ------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (("--atol", "inf"), "inf is not a finite number"),
    (("--rtol", "nan"), "nan is not a finite number"),
    (("--eps", "inf"), "inf is not a finite number"),
])
def test_cli_floats_must_be_finite(tiny_ckpt, capsys, args, message):
    assert message in one_line(st(capsys, "nll", tiny_ckpt, *args))


@pytest.mark.parametrize("override, field", [
    ("train.steps=true", "train.steps"), ("train.batch_size=true", "train.batch_size"),
    ("optim.lr=false", "optim.lr"), ("net.ch_mult=[1, true]", "net.ch_mult"),
    ("truncation.k=true", "truncation.k"), ("seed=true", "seed"),
])
def test_a_boolean_is_not_a_number(tiny_recipe, capsys, override, field):
    flat = refused(st(capsys, "recipe", "validate", tiny_recipe(), override))
    assert f"{field}: true is a boolean, not a number" in flat or \
        f"{field}: false is a boolean, not a number" in flat


@pytest.mark.parametrize("override, message", [
    ('net.nf="32"', "net.nf: '32' is text, not a number (write it without quotes)"),
    ("net.ch_mult=[1, '2']", "net.ch_mult: '2' is text, not a number"),
    ('optim.lr="1e-3"', "optim.lr: '1e-3' is text"),
    ("train.steps=1e30", "train.steps: 1e+30 is too large (whole-number settings stop at 2^63)"),
    ("train.batch_size=9223372036854775808", "train.batch_size: 9223372036854775808 is too large"),
    ("seed=9223372036854775808", "seed: 9223372036854775808 is too large"),
])
def test_quoted_and_huge_numbers_are_refused(tiny_recipe, capsys, override, message):
    assert message in refused(st(capsys, "recipe", "validate", tiny_recipe(), override))


def test_exponents_without_a_point_are_numbers(tiny_recipe):
    """YAML 1.2 floats: `1e-5` (text to PyYAML's YAML 1.1) is a number in recipes and
    overrides; a quoted one stays text, an integer stays an integer."""
    from stcli.components.recipe import load_recipe, safe_load

    assert safe_load("[1e-5, 2E+3, -3e2, .5e1, 10, '1e3', 1e5x]") == [1e-5, 2000.0, -300.0, 5.0, 10,
                                                                       "1e3", "1e5x"]
    recipe = load_recipe(tiny_recipe(), ["optim.lr=2e-4", "truncation.eps=1e-3", "train.steps=1e2"])
    assert (recipe.optim.lr, recipe.truncation.eps, recipe.train.steps) == (2e-4, 1e-3, 100)


# --- overrides: a section merges, a key is given once ----------------------------------------------
def test_a_section_override_merges_and_a_key_is_given_once(tiny_recipe, capsys):
    from stcli.components.recipe import load_recipe

    path = tiny_recipe()
    r = load_recipe(path, ["train.batch_size=4", "train={steps: 3}"])
    assert (r.train.batch_size, r.train.steps, r.train.ckpt_every) == (4, 3, 3)  # recipe's ckpt_every kept
    switched = load_recipe(path, ["truncation={name: hard}"])  # another component: replaced
    assert switched.truncation.name == "hard" and switched.truncation.eps == 1e-5
    assert "dropped eps: 1e-05, k: 1.0" in capsys.readouterr().err  # said, not silent
    for pair in (["train.steps=5", "train.steps=6"], ["train={steps: 3}", "train.steps=4"],
                 ["train=3", "train.steps=2"]):
        flat = refused(st(capsys, "recipe", "validate", path, *pair))
        assert "already set; give each key once" in flat, pair


# --- names and paths -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a\nb", "tab\there", " padded", "bell\x07"])
def test_run_names_are_printable_folder_names(tiny_recipe, capsys, name):
    flat = refused(st(capsys, "recipe", "validate", tiny_recipe(), f"name={json.dumps(name)}"))
    assert "name:" in flat and "printable" in flat


@pytest.mark.parametrize("value", ["''", "' '", "", " "])
def test_an_empty_out_dir_is_refused_not_read_as_the_default(tiny_recipe, capsys, value):
    """Also `train.out_dir=$UNSET` (nothing after `=`): refused, not null (= runs/<name>)."""
    flat = refused(st(capsys, "recipe", "validate", tiny_recipe(), f"train.out_dir={value}"))
    assert "train.out_dir" in flat
    assert ("has no value (write train.out_dir=null for none)" in flat) == (not value.strip())


def test_an_override_yaml_reads_as_a_comment_is_refused_and_null_spelled_out_is_kept(tiny_recipe,
                                                                                       capsys):
    from stcli.components.recipe import load_recipe

    flat = refused(st(capsys, "recipe", "validate", tiny_recipe(), "train.out_dir=#run1"))
    assert "override 'train.out_dir=#run1' reads as no value (a YAML comment?)" in flat
    for null in ("null", "~"):
        assert load_recipe(tiny_recipe(), [f"train.out_dir={null}"]).train.out_dir is None


def test_train_never_writes_into_a_folder_of_other_files(tiny_recipe, tmp_path, capsys):
    samples = tmp_path / "samples_folder"
    samples.mkdir()
    (samples / "000000.png").write_bytes(b"not mine to touch")
    (samples / "manifest.json").write_text("{}")
    before = snapshot(samples)
    flat = one_line(st(capsys, "train", tiny_recipe(), f"train.out_dir={samples}"))
    assert "is not a run folder of st train" in flat and "000000.png" in flat
    assert snapshot(samples) == before and sorted(p.name for p in samples.iterdir()) == [
        "000000.png", "manifest.json"]


# --- sizes: estimated before starting --------------------------------------------------------------
def test_a_net_too_large_for_memory_is_refused_before_allocating(tiny_recipe, tmp_path, capsys):
    out = tmp_path / "big"
    flat = one_line(st(capsys, "train", tiny_recipe(), "net.nf=100000", f"train.out_dir={out}"))
    assert "training needs at least" in flat and "GiB free" in flat
    assert not out.exists()
    # images too large: refused before the data set is resized in memory
    flat = one_line(st(capsys, "train", tiny_recipe(), "data.image_size=100000", f"train.out_dir={out}"))
    assert "images are 1x100000x100000" in flat and "GiB free" in flat
    assert not out.exists()


def test_more_samples_than_the_disk_holds_are_refused(tiny_ckpt, tmp_path, capsys):
    flat = one_line(st(capsys, "sample", tiny_ckpt, "-n", "1000000000000000", "--out", tmp_path / "s"))
    assert "1,000,000,000,000,000 samples need about" in flat and "free" in flat
    assert not (tmp_path / "s").exists()


def test_recipes_and_overrides_nested_too_deep(tiny_recipe, tmp_path, capsys):
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: x\ndata: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "is nested more than 32 levels deep" in one_line(st(capsys, "recipe", "validate", deep))
    flat = one_line(st(capsys, "recipe", "validate", tiny_recipe(),
                       "net.ch_mult=" + "[" * 5000 + "]" * 5000))
    assert "nested more than 32 levels deep" in flat and len(flat) < 300


def test_a_recipe_of_aliases_of_aliases_is_refused_before_it_expands(tmp_path, capsys):
    """Nine levels of nine aliases (a "billion laughs" of 9^9 values, a few hundred bytes)."""
    lines = ["a0: &a0 [" + ", ".join(["x"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\nname: x\n")
    assert "more than 100,000 values once its aliases" in one_line(st(capsys, "recipe", "validate", bomb))


# --- the launcher's variables ----------------------------------------------------------------------
@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer >= 1"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0' is not an integer >= 1"),
    ({"RANK": "-1"}, "RANK='-1' is not an integer >= 0"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT unset"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}, "WORLD_SIZE=2 but RANK unset"),
    ({"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"},
     "RANK=3 of WORLD_SIZE=2"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK=1 of WORLD_SIZE=1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"}, "is not a port"),
])
def test_launcher_variables_are_checked_before_the_process_group(tiny_recipe, tmp_path, capsys,
                                                                 monkeypatch, env, message):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    flat = one_line(st(capsys, "train", tiny_recipe(), f"train.out_dir={out}"))
    assert message in flat and not out.exists()


def test_a_rank_whose_peers_never_come_says_so_and_stops(tiny_recipe, tmp_path, monkeypatch):
    """RANK=0 of 2 with no rank 1: a line saying what it waits for, then exit 2 at the timeout
    (not a silent wait, not a traceback); nothing written."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "ST_DIST_TIMEOUT": "2"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = run_st("train", tiny_recipe(), f"train.out_dir={out}", timeout=120)
    assert f"waiting for 2 processes to join at 127.0.0.1:{port}" in result.stdout + result.stderr
    assert result.returncode == 2 and "did not all join" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
