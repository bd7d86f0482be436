"""Clusters: Slurm's environment read by stcli.infra.distributed (node-list parser, derived torchrun
variables, refused inconsistencies), a real 2-process gloo group formed through a simulated
srun, the process-group timeout, the docs' multi-node torchrun command and the sbatch script."""

import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from conftest import ROOT, clean_env

from stcli.infra import distributed
from stcli.infra.distributed import expand_nodelist, slurm_environment, slurm_port
from stcli.infra.errors import UserError

SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"

def free_slurm_job_id() -> int:
    """A job id whose derived port is free on this machine now."""
    for _ in range(100):
        job = random.randrange(10**6)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", slurm_port(job)))
                return job
            except OSError:
                continue
    raise AssertionError("no free port in the Slurm range")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu5", ["gpu5"]),
    ("node[01-03,7],gpu5", ["node01", "node02", "node03", "node7", "gpu5"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("cn[098-101]", ["cn098", "cn099", "cn100", "cn101"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("a,b[2],c-d.example.org", ["a", "b2", "c-d.example.org"]),
])
def test_nodelist_expands_like_slurm(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["", "node[1-3", "node]1", "node[3-1]", "node[a-b]", "a,,b", "n[]"])
def test_malformed_nodelist_is_refused(bad):
    with pytest.raises(UserError, match="node list"):
        expand_nodelist(bad)


def task(rank: int, ntasks: int = 4, **extra) -> dict[str, str]:
    return {"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(ntasks), "SLURM_LOCALID": str(rank % 2),
            "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456", **extra}


def test_slurm_task_gets_torchrun_variables():
    env = slurm_environment(task(3))
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(slurm_port(123456))}
    assert 15000 <= slurm_port(123456) < 30000 and slurm_port(123456) != slurm_port(123457)
    # the step's node list (srun -N1 inside a 2-node job) wins over the job's
    assert slurm_environment(task(0, SLURM_STEP_NODELIST="gpu08"))["MASTER_ADDR"] == "gpu08"
    explicit = slurm_environment(task(0, MASTER_ADDR="head", MASTER_PORT="4000"))
    assert "MASTER_ADDR" not in explicit and "MASTER_PORT" not in explicit


def test_slurm_ignored_alone_and_under_torchrun():
    assert slurm_environment({}) == {}
    assert slurm_environment(task(0, ntasks=1)) == {}  # one task: nothing to join
    # srun starting torchrun (one task per node): torchrun's own variables rule
    assert slurm_environment(task(0, ntasks=2, TORCHELASTIC_RUN_ID="x", WORLD_SIZE="16")) == {}


@pytest.mark.parametrize("env, message", [
    (task(4), "SLURM_PROCID=4 with SLURM_NTASKS=4"),
    (task(1, WORLD_SIZE="8"), "WORLD_SIZE=8 but Slurm says 4"),
    (task(1, RANK="2"), "RANK=2 but Slurm says 1"),
    (task(1, SLURM_NTASKS="four"), "SLURM_NTASKS='four'"),
    ({**task(1), "SLURM_JOB_NODELIST": ""}, "MASTER_ADDR"),
])
def test_inconsistent_slurm_environment_is_refused(env, message):
    with pytest.raises(UserError, match=re.escape(message)):
        slurm_environment(env)


def test_timeout_default_and_override(monkeypatch):
    monkeypatch.delenv("ST_DIST_TIMEOUT", raising=False)
    assert distributed.timeout() == timedelta(seconds=distributed.DEFAULT_TIMEOUT_S) > timedelta(hours=1)
    monkeypatch.setenv("ST_DIST_TIMEOUT", "90")
    assert distributed.timeout() == timedelta(seconds=90)
    monkeypatch.setenv("ST_DIST_TIMEOUT", "soon")
    with pytest.raises(UserError, match="ST_DIST_TIMEOUT"):
        distributed.timeout()


LEFT_THREADS = """
import os, socket
from stcli.infra import distributed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(WORLD_SIZE="1", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
distributed._join("gloo", 1)
import torch
torch.optim.Adam(torch.nn.Linear(2, 2).parameters(), fused=True)  # imports torch._dynamo
distributed.teardown()
print(*[open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")])
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads Linux's /proc")
def test_teardown_leaves_no_gloo_thread():
    """A group torn down leaves none of gloo's threads behind: one still alive at the
    interpreter's shutdown aborted, now and then, a rank whose exit code 2 was due (CI saw it)."""
    done = subprocess.run([sys.executable, "-c", LEFT_THREADS], env=clean_env(), text=True,
                          capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "gloo" not in done.stdout, done.stdout


def srun_probes(tmp_path, delay: float, **extra):
    """Two probe tasks started as srun would start them on one node (no torchrun)."""
    job = free_slurm_job_id()
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "slurm_probe.py"), str(tmp_path), str(delay)],
        env=clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r),
                      SLURM_JOB_NODELIST="localhost,gpu[2-3]", SLURM_JOB_ID=str(job), **extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        return [(p.wait(timeout=120), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_simulated_srun_tasks_form_one_group_with_the_timeout_set(tmp_path):
    """Two tasks with Slurm's variables form one group (both in the all-reduce), and
    ST_DIST_TIMEOUT reaches it: rank 1 gives up waiting for a rank 0 that is slower than that."""
    results = srun_probes(tmp_path, delay=7, ST_DIST_TIMEOUT="3")
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, got in enumerate(ranks):
        assert got["rank"] == r and got["world"] == 2
        assert got["total"] == 3.0  # 1 + 2: both ranks were in the all-reduce
        assert got["env"]["MASTER_ADDR"] == "localhost" and got["env"]["LOCAL_RANK"] == str(r)
    assert ranks[0]["env"]["MASTER_PORT"] == ranks[1]["env"]["MASTER_PORT"]
    assert results[1][0] != 0 and "timed out" in results[1][1].lower(), results[1][1][-2000:]
    assert not (tmp_path / "second-1.json").exists()


def test_st_refuses_inconsistent_slurm_environment(tiny_recipe):
    path = tiny_recipe("bad")
    env = clean_env(SLURM_PROCID="2", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost",
                    SLURM_JOB_ID="7")
    res = subprocess.run([sys.executable, "-m", "stcli", "train", str(path)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "SLURM_PROCID=2 with SLURM_NTASKS=2" in res.stderr.replace("\n", "")
    assert not (path.parent / "bad").exists()


def test_procs_refused_under_several_srun_tasks(monkeypatch):
    from stcli.jobs.cli import _relaunch_if_asked

    for key, value in task(0, ntasks=2).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(UserError, match="under srun start one task per GPU"):
        _relaunch_if_asked(2)


def doc_torchrun_command() -> list[str]:
    """The multi-node torchrun command of docs/training.md, as arguments."""
    text = (ROOT / "docs" / "training.md").read_text()
    block = re.search(r"^torchrun .*?(?<!\\)\n", text, flags=re.S | re.M).group(0)
    return shlex.split(block.replace("\\\n", " "))


def test_documented_multinode_torchrun_command_runs(tiny_recipe):
    """The docs' command, on one node with 2 processes: same rendezvous flags, a real run."""
    args = doc_torchrun_command()
    flags = {a.split("=")[0] for a in args if a.startswith("--")}
    assert flags == {"--nnodes", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id"}
    assert args[-4:-1] == ["-m", "stcli", "train"] and (ROOT / args[-1]).is_file()
    values = {"--nnodes": "1", "--nproc-per-node": "2", "--rdzv-endpoint": f"127.0.0.1:{free_port()}"}
    path = tiny_recipe("rdzv", train={"steps": 2})
    cmd, it = [], iter(args[1:-1])
    for a in it:
        cmd += [a, values.get(a, next(it))] if a.startswith("--") else [a]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", *cmd, str(path)],
                         capture_output=True, text=True, env=clean_env(), timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("x 2 process(es)") == 1
    assert (path.parent / "rdzv" / "ckpt.safetensors").is_file()


FAKE_SRUN = """#!{python}
# srun as far as the sbatch script needs it: SLURM_NTASKS tasks of the command on this node
import os, subprocess, sys
args = sys.argv[1:]
while args[0].startswith("-"):
    args.pop(0)
if "SRUN_RECORD" in os.environ:  # only say what would run
    open(os.environ["SRUN_RECORD"], "w").write("\\n".join(args))
    sys.exit(0)
n = int(os.environ["SLURM_NTASKS"])
procs = [subprocess.Popen(args, env={{**os.environ, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)}})
         for r in range(n)]
sys.exit(max(p.wait() for p in procs))
"""


def test_sbatch_script_is_valid_bash():
    res = subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    directives = [line for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    assert any("--ntasks-per-node" in d for d in directives) and any("--requeue" in d for d in directives)


def test_sbatch_script_runs_one_group_then_resumes(tiny_recipe, tmp_path):
    """The script under a stand-in srun (2 tasks, Slurm variables, no torchrun): one run of world
    size 2; run again (a requeued job), it asks to resume from the checkpoint."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    path, out = tiny_recipe("slurm", train={"steps": 2, "ckpt_every": 2}), tmp_path / "job-run"
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_NTASKS="2",
                    SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(free_slurm_job_id()),
                    ST_OUT=str(out))
    res = subprocess.run(["bash", str(SBATCH), str(path)], capture_output=True, text=True, env=env,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("x 2 process(es)") == 1 and res.stdout.count("done: step 2") == 1
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    record = tmp_path / "argv.txt"
    res = subprocess.run(["bash", str(SBATCH), str(path), "train.steps=3"], capture_output=True,
                         text=True, env={**env, "SRUN_RECORD": str(record)}, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    # requeued: the same command, resuming (resume itself is tested in test_train.py)
    assert record.read_text().split("\n") == ["st", "train", str(path), f"train.out_dir={out}",
                                              "train.steps=3", "--resume"]


def test_procs_refused_under_torchrun(monkeypatch):
    """`torchrun --nproc-per-node 2 st train --procs 4` ran 2 processes, --procs said nothing."""
    from stcli.jobs.cli import _relaunch_if_asked

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="under torchrun .here 2 processes. leave it out"):
        _relaunch_if_asked(4)
    _relaunch_if_asked(1)
