"""Digits jobs trained to convergence, loss by loss (`run.py --converge`; docs/reproduction.md).

For each loss the seed-0 job, the *pilot*, trains in chunks (`Budget.chunk` steps, growing with
the step: `next_stop`); after each chunk its EMA snapshot is measured (`evaluate.measure`: NLL,
NELBO, Heun FID) and the criterion of `convergence.converged_at` is applied to every measured
snapshot so far, as CRITERION sets it: the first snapshot s that nothing later beats up to
1.5 x s (the NLL lower by 0.02 bpd, the NELBO lower by 0.02 bpd and 2 paired s.e., or the FID
lower by 2 s.e.).  s is the
loss's budget: seed 0 is reported at that snapshot and seeds 1.. train to exactly that step (same
recipe, so the same EMA weights the pilot's snapshot holds).  A loss that converges later runs
longer; one that has not converged when the pilot reaches `Budget.steps` is reported there, its
verdict ``"step": null``.

Nothing computed is lost to an interruption: the pilot's measured points go to
<results>/pilots/<data>/<loss>.json after each measurement, every training resumes from its
checkpoint, and a finished job's result is added to <results>/<data>.json at once.  The run
folder does not outlive a machine, so `run.py --keep` copies every unfinished job's resume
checkpoint (and a converged pilot's snapshot) to STATE, which is committed; a job whose run folder
lacks them starts from those copies (`restore`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from convergence import QUALITY, converged_at

CRITERION = {"tol": "resolution", "delta": 0.02, "window": 1.5, "later": 2}
STATE = Path(__file__).parent / "state"


def _kept(job) -> Path:
    return STATE / job.data.key / job.variant.key / f"seed{job.seed}"


def restore(job) -> None:
    """Copy the kept checkpoints of `job` into its run folder where the folder lacks them."""
    kept = _kept(job)
    for f in sorted(kept.glob("*.safetensors")) if kept.is_dir() else ():
        if not (job.out_dir / f.name).is_file():
            job.out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, job.out_dir / f.name)


def keep(jobs, results: Path) -> list[Path]:
    """Copy each unfinished job's resume checkpoint, and each converged pilot's snapshot at its
    budget, to STATE (replacing older copies); drop the copies of finished jobs."""
    saved = []
    for job in jobs:
        kept, finished = _kept(job), (job.out_dir / "result.json").is_file()
        state = pilot_file(results, job.data.key, job.variant.key)
        pilot = json.loads(state.read_text()) if job.seed == 0 and state.is_file() else {}
        budget, chunks = pilot.get("budget"), pilot.get("chunks", [])
        wanted = [f"ckpt-{budget}.safetensors"] if budget else [] if finished else ["ckpt.safetensors"]
        if chunks and not budget:  # a pilot's last snapshot, perhaps not yet measured
            wanted.append(f"ckpt-{chunks[-1]['step']}.safetensors")
        wanted = [n for n in wanted if (job.out_dir / n).is_file()]
        if not wanted and not finished:
            continue  # nothing new here (a run folder of another machine): keep what is kept
        for old in kept.glob("*.safetensors") if kept.is_dir() else ():
            if old.name not in wanted:
                old.unlink()
        for name in wanted:
            kept.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(job.out_dir / name, kept / name)
            saved.append(kept / name)
    return saved


def next_stop(step: int, chunk: int) -> int:
    """The next measured step: every `chunk` steps up to 4 chunks, then about a quarter of the
    steps so far (1k, 2k, 3k, 4k, 5k, ..., 8k, 10k, 12k, 15k, 18k, 22k, 27k for chunk 1k)."""
    return step + chunk * max(1, step // (4 * chunk))


def pilot_file(results: Path, data: str, loss: str) -> Path:
    return results / "pilots" / data / f"{loss}.json"


def at_steps(job, steps: int):
    """The same job with train.steps = `steps` (everything else, the seed included, equal)."""
    return dataclasses.replace(job, budget=dataclasses.replace(job.budget, steps=steps))


def run_pilot(job, classifier: Path | None, results: Path) -> dict:
    """Train the seed-0 `job` chunk by chunk until its snapshots converge or reach
    job.budget.steps; return the loss's state {points, chunks, verdict, budget}."""
    torch.set_num_threads(1)
    path = pilot_file(results, job.data.key, job.variant.key)
    state = json.loads(path.read_text()) if path.is_file() else {"points": [], "chunks": []}
    key = QUALITY[job.data.key][0]
    job.out_dir.mkdir(parents=True, exist_ok=True)
    restore(job)
    measured = {p["step"] for p in state["points"]}
    lost = [c for c in state["chunks"] if c["step"] not in measured
            and not (job.out_dir / f"ckpt-{c['step']}.safetensors").is_file()]
    if lost:  # trained on a machine since lost, never measured: trained again
        state["chunks"] = [c for c in state["chunks"] if c not in lost]
    while True:
        _measure_new(job, classifier, state, path)
        verdict = converged_at(state["points"], key, **CRITERION)
        trained = state["chunks"][-1]["step"] if state["chunks"] else 0
        if verdict["step"] is not None or trained >= job.budget.steps:
            break
        _train_chunk(at_steps(job, min(next_stop(trained, job.budget.chunk), job.budget.steps)),
                     state, path)
    state["verdict"] = verdict
    state["budget"] = verdict["step"] if verdict["step"] is not None else trained
    _save(path, state)
    return state


def _train_chunk(job, state: dict, path: Path) -> None:
    from evaluate import log_path

    from stcli.jobs.train import train

    t, c = time.perf_counter(), time.process_time()
    with open(log_path(job), "a") as log, contextlib.redirect_stdout(log):
        result = train(job.recipe(), resume="auto")
    state["chunks"].append({"step": job.budget.steps, "loss": result.loss,
                            "train_s": time.perf_counter() - t, "train_cpu_s": time.process_time() - c})
    _save(path, state)


def _measure_new(job, classifier: Path | None, state: dict, path: Path) -> None:
    from evaluate import measure

    done = {p["step"] for p in state["points"]}
    for step in (c["step"] for c in state["chunks"]):
        ckpt = job.out_dir / f"ckpt-{step}.safetensors"
        if step not in done:
            point = measure(ckpt, job.data, job.budget, job.out_dir / f"samples-{step}", classifier)
            state["points"] = sorted([*state["points"], point | {"step": step}], key=lambda p: p["step"])
            _save(path, state)
            key = QUALITY[job.data.key][0]
            print(f"  pilot {job.variant.key} step {step}: NLL {point['nll']['mean']:.4f} NELBO "
                  f"{point['nelbo']['mean']:.4f} {key} {point[key]:.3g} ± {point[key + '_se']:.2g}",
                  flush=True)


def pilot_result(job, state: dict, classifier: Path | None) -> dict:
    """Seed 0's row of the tables: the pilot's measurement of its snapshot at the loss's budget,
    the further samplers on that snapshot, and the training cost up to that step."""
    from evaluate import draw, quality

    s = state["budget"]
    snap = job.out_dir / f"ckpt-{s}.safetensors"
    at = at_steps(job, s)
    if not snap.is_file():  # lost with an earlier machine: the same recipe and seed remake it
        remake = dataclasses.replace(at, root=job.out_dir / "remake")
        _train_chunk(remake, {"chunks": []}, remake.out_dir / "chunks.json")
        shutil.copyfile(remake.out_dir / snap.name, snap)
    point = next(p for p in state["points"] if p["step"] == s)
    chunks = [c for c in state["chunks"] if c["step"] <= s]
    result = {"data": job.data.key, "variant": job.variant.key, "label": job.variant.label,
              "seed": job.seed, "recipe": at.recipe().to_dict(), "command": at.command(),
              "final_loss": chunks[-1]["loss"], "resumed": len(chunks) > 1,
              "train_s": sum(c["train_s"] for c in chunks),
              "train_cpu_s": sum(c["train_cpu_s"] for c in chunks),
              "converged": state["verdict"], "pilot_steps": state["chunks"][-1]["step"],
              "pilot_train_cpu_s": sum(c["train_cpu_s"] for c in state["chunks"]),
              "pilot_measure_cpu_s": sum(p["measure_cpu_s"] for p in state["points"])}
    result.update({k: v for k, v in point.items() if k != "step"})
    t, c = time.perf_counter(), time.process_time()
    for name, spec in list(job.budget.samplers.items())[1:]:
        samples = draw(snap, job.budget.n_samples, spec, job.out_dir / f"samples_{name}")
        result.update({f"{k}_{name}": v for k, v in quality(samples, job.data, classifier).items()})
    result["curve"] = [p for p in state["points"] if p["step"] != s]
    result["eval_s"] = point["measure_s"] + time.perf_counter() - t
    result["eval_cpu_s"] = point["measure_cpu_s"] + time.process_time() - c
    return result


def pilot_and_result(job, classifier: Path | None, results: Path) -> tuple[dict, dict]:
    state = run_pilot(job, classifier, results)
    return state, pilot_result(job, state, classifier)


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=0))
    tmp.replace(path)


def seed_job(job, classifier: Path | None) -> dict:
    """A further seed trained to its pilot's budget, from its kept checkpoint if any."""
    from evaluate import run_job

    restore(job)
    return run_job(job, classifier)


def settled(job, results: Path) -> int | None:
    """The budget of a pilot whose row is already in <results>/<data>.json, else None."""
    state, table = pilot_file(results, job.data.key, job.variant.key), results / f"{job.data.key}.json"
    if not (state.is_file() and table.is_file()):
        return None
    budget = json.loads(state.read_text()).get("budget")
    rows = json.loads(table.read_text())["runs"]
    return budget if any((r["variant"], r["seed"], r["recipe"]["train"]["steps"]) ==
                         (job.variant.key, 0, budget) for r in rows) else None
