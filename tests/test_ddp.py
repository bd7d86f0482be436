"""A real 2-process gloo process group: identical parameters and the same tau on every rank."""

import json
import os
import subprocess
import sys

import numpy as np
import torch
import yaml
from conftest import ROOT, TINY, ranks, run_st, run_two
from PIL import Image
from safetensors.torch import load_file


def run_probe(path, out, *overrides):
    res = run_two(path, out, *overrides, program=(str(ROOT / "tests" / "ddp_probe.py"),))
    assert res.returncode == 0, res.stderr[-3000:]


def test_two_gloo_processes_stay_in_lockstep(tiny_recipe, tmp_path):
    """...and draw the sample grid together: each rank its share of the rows (no rank waits in
    a collective while another samples); row i depends only on (seed, i), so the gathered grid
    is the one a single process draws from the same EMA weights."""
    path = tiny_recipe("ddp", train={"steps": 4, "micro_batches": 2, "sample_every": 4,
                                     "grid_size": 3})
    run_probe(path, tmp_path)
    taus = [json.loads((tmp_path / f"tau-{r}.json").read_text()) for r in (0, 1)]
    assert taus[0]["world"] == taus[1]["world"] == 2
    assert len(taus[0]["tau"]) == 4 and taus[0]["tau"] == taus[1]["tau"]
    assert len(set(taus[0]["tau"])) == 4  # a fresh tau every step
    p0, p1 = (load_file(str(tmp_path / f"params-{r}.safetensors")) for r in (0, 1))
    for k in p0:
        assert torch.equal(p0[k], p1[k]), k
    assert [t["grid_rows"] for t in taus] == [[[0]], [[1, 2]]]  # one grid (step 4), 1 + 2 rows
    two, one = (np.asarray(Image.open(p)) for p in (path.parent / "ddp" / "samples" / "grid-4.png",
                                                    tmp_path / "single-process-grid.png"))
    assert one.shape == two.shape == (102, 102, 3) and np.array_equal(one, two)  # 2x2 of 8px x6
    cells = [one[2:10, 2:10], one[2:10, 12:20], one[12:20, 2:10]]  # 8px images, 2px padding
    assert not np.array_equal(cells[0], cells[1]) and not np.array_equal(cells[1], cells[2])


def test_stf_reference_gathered_across_ranks(tiny_recipe, tmp_path):
    """all_gather: both ranks see the same 32-image reference: rank r's rows 16r..16r+8 are its
    own two micro-batches, then 8 extra images; without it each rank keeps its own 16."""
    path = tiny_recipe("stf", train={"steps": 2, "micro_batches": 2})
    target = "loss.target={name: stf, reference_batch: 32, all_gather: true}"
    run_probe(path, tmp_path, target)
    refs = [load_file(str(tmp_path / f"references-{r}.safetensors")) for r in (0, 1)]
    for call in range(4):  # 2 steps x 2 micro-batches
        ref0, ref1 = refs[0][f"reference.{call}"], refs[1][f"reference.{call}"]
        assert ref0.shape[0] == 32 and torch.equal(ref0, ref1)
        for rank in (0, 1):
            step = call // 2
            own = torch.cat([refs[rank][f"x0.{2 * step + i}"] for i in (0, 1)])
            assert torch.equal(ref0[16 * rank:16 * rank + 8], own)
    (tmp_path / "local").mkdir()
    run_probe(path, tmp_path / "local", target.replace("true", "false"),
              f"train.out_dir={tmp_path / 'local' / 'run'}")
    local = [load_file(str(tmp_path / "local" / f"references-{r}.safetensors")) for r in (0, 1)]
    assert local[0]["reference.0"].shape[0] == 32
    assert not torch.equal(local[0]["reference.0"], local[1]["reference.0"])


def test_cli_procs_relaunches_through_torchrun(tiny_recipe):
    path = tiny_recipe("procs", train={"steps": 2})
    res = run_st("train", path, "--procs", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "x 2 process(es)" in res.stdout
    assert (path.parent / "procs" / "ckpt.safetensors").is_file()



def test_a_two_process_resume_with_dropout_is_bit_exact(tiny_recipe):
    """The checkpoint holds rank 0's RNG state only; restored on both ranks, rank 1 repeated
    rank 0's dropout masks after a resume (590 of 741 tensors differed from the unbroken run).
    Every rank's global RNG now restarts from (seed, rank, step) at each checkpoint."""
    assert TINY["net"]["dropout"] > 0
    whole = tiny_recipe("whole", train={"steps": 4, "ckpt_every": 2})
    part = tiny_recipe("part", train={"steps": 2, "ckpt_every": 2})
    for args in ((whole,), (part,), (part, "--resume", "train.steps=4")):
        res = run_two("train", *args)
        assert res.returncode == 0, res.stderr[-3000:]
    a = load_file(str(whole.parent / "whole" / "ckpt.safetensors"))
    b = load_file(str(part.parent / "part" / "ckpt.safetensors"))
    differ = [k for k in a if k.startswith(("model.", "ema.", "optim.")) and not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]


def two_ranks(*argvs: list, cwds=(ROOT, ROOT)) -> list[str]:
    """Both ranks of `ranks(*argvs)` must exit with code 2 and no traceback: their standard errors."""
    errs = []
    with ranks(*argvs, cwds=cwds) as procs:
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 2 and "Traceback" not in err, err
            errs.append(err)
    return errs


PROBE = """
import sys
from stcli.infra import distributed
from stcli.infra.errors import UserError

ctx = distributed.setup("cpu")
try:
    with distributed.checked(ctx, "write its share"):
        if ctx.rank == 1:
            raise OSError(28, "No space left on device")
    print("passed")
except UserError as err:
    print(f"UserError: {err}")
except OSError as err:
    print(f"OSError: {err}")
"""


def test_an_error_that_is_not_the_users_still_stops_every_rank(tmp_path):
    """A full disk (or a bug) on one rank keeps its own error there, and its peers are told
    rather than left waiting in their next collective."""
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node=2", "--tee=1", str(tmp_path / "probe.py")],
                         capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert "0]:UserError: process(es) 1 could not write its share" in res.stdout, res.stdout
    assert "1]:OSError: [Errno 28] No space left on device" in res.stdout, res.stdout


def test_ranks_started_with_different_options_are_refused(tiny_ckpt, tmp_path):
    """`--seed $RANDOM` under srun: each rank drew with its own seed and the folder's manifest
    said rank 0's. Every rank now refuses, naming the ranks that differ; nothing is drawn."""
    argv = ["sample", tiny_ckpt, "-n", "4", "--out", tmp_path / "s", "--device", "cpu"]
    for err in two_ranks([*argv, "--seed", "0"], [*argv, "--seed", "1"]):
        assert "started with different sampling settings: rank(s) 1 differ from rank 0" in err, err
    assert not list((tmp_path / "s").glob("0*/*.png"))


def test_a_rank_that_cannot_read_its_inputs_stops_every_rank(tiny_ckpt, tmp_path):
    """A relative path read from another working directory on rank 1 (another node's file
    system): rank 1 said why and stopped, rank 0 waited in its next collective and died there
    with gloo's traceback (NCCL: hung). Now each command's per-rank inputs are read before a
    shared check: rank 1 gives its message, rank 0 names rank 1; both exit with code 2."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    (here / "m.safetensors").write_bytes(tiny_ckpt.read_bytes())
    for argv in (["sample", "m.safetensors", "-n", "2", "--out", tmp_path / "s", "--device", "cpu"],
                 ["nll", "m.safetensors", "--limit", "2", "--device", "cpu"]):
        ok, failed = two_ranks(argv, argv, cwds=(here, elsewhere))
        assert "m.safetensors does not exist" in failed, failed
        assert "process(es) 1 could not read its inputs" in ok, ok
    assert not (tmp_path / "s").exists()


def test_ranks_resuming_from_different_checkpoints_are_refused(tiny_recipe, tmp_path):
    """train.out_dir relative, rank 1 in a folder without the run (a run folder not shared
    between nodes): with --resume rank 1 cannot find the checkpoint; with --resume auto it
    started afresh beside a resumed rank 0. Both refused on every rank, the checkpoint intact."""
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir(), elsewhere.mkdir()
    recipe = tiny_recipe("r", train={"steps": 2, "out_dir": "run"})
    res = run_st("train", recipe, cwd=here)
    assert res.returncode == 0, res.stderr[-2000:]
    before = (here / "run" / "ckpt.safetensors").read_bytes()
    argv = ["train", recipe, "--resume", "train.steps=4"]
    ok, failed = two_ranks(argv, argv, cwds=(here, elsewhere))
    assert "does not exist" in failed and "process(es) 1 could not check its inputs" in ok, (ok, failed)
    argv = ["train", recipe, "--resume", "auto", "train.steps=4"]
    for err in two_ranks(argv, argv, cwds=(here, elsewhere)):
        assert "different checkpoints to resume from" in err, err
    assert (here / "run" / "ckpt.safetensors").read_bytes() == before
    assert not (elsewhere / "run").exists()


def test_ranks_reading_different_data_are_refused(tiny_recipe, tmp_path):
    """A relative data.root holding other images on rank 1's node: each rank trained on its own
    data under one recipe. Refused on every rank from what each read, before any folder."""
    recipe = tiny_recipe("d")
    text = yaml.safe_load(recipe.read_text())
    text["data"] = {"name": "folder", "root": "imgs", "image_size": 8}
    recipe.write_text(yaml.safe_dump(text))
    for cwd, value in ((tmp_path / "here", 40), (tmp_path / "elsewhere", 200)):
        (cwd / "imgs").mkdir(parents=True)
        for i in range(16):
            Image.new("RGB", (8, 8), (value + i, 0, 0)).save(cwd / "imgs" / f"{i}.png")
    argv = ["train", recipe]
    for err in two_ranks(argv, argv, cwds=(tmp_path / "here", tmp_path / "elsewhere")):
        assert "started with different data (as each node reads it): rank(s) 1 differ" in err, err
    assert not (tmp_path / "d").exists()


def test_a_rank_that_dies_mid_training_stops_its_peer_with_one_message(tiny_recipe, tmp_path):
    """Rank 1 killed (out of memory on its node, a node lost) while rank 0 trains: rank 0's next
    collective fails, and st says so in one line instead of gloo's traceback; the last
    checkpoint is intact."""
    import signal
    import time

    from stcli.infra.checkpoint import load

    path = tiny_recipe("dies", train={"steps": 100000, "ckpt_every": 2, "log_every": 1})
    argv = ["train", path]
    with ranks(argv, argv, stdout=subprocess.DEVNULL) as procs:
        ckpt = tmp_path / "dies" / "ckpt.safetensors"
        deadline = time.monotonic() + 120
        while not ckpt.is_file() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        _, err = procs[0].communicate(timeout=120)
    assert procs[0].returncode == 1 and "Traceback" not in err, err
    assert "another process of this run stopped while this one waited for it" in err, err
    tensors, meta = load(ckpt)
    assert meta["step"] >= 2 and all(torch.isfinite(t).all() for t in tensors.values()
                                      if t.is_floating_point())
