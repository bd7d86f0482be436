"""One job of the reproduction: train a variant, then measure NLL, NELBO and sample quality,
all through stcli's Python API (the same code as `st train`, `st nll`, `st sample`).

    NLL    `st nll CKPT --correction after --nelbo --divergence {exact|rademacher} --limit N`
           (ODE likelihood after correction, Eq. 7; NELBO with residual, Eq. 8), bits/dim
    samples `st sample CKPT -n N --sampler heun --steps S --format npz` (probability-flow ODE;
           S = 17 and the final Tweedie step make EDM's 35 NFE), and, where the budget asks for
           it, `st sample CKPT -n N --format npz` with the recipe's own sampler (Euler-Maruyama)
    quality digits: FID with the digit classifier of digits_fid.py against the train split;
           toy2d: MMD^2 to the exact mixture (gmm_mmd.py) at two kernel widths
    curve  the same numbers (Heun only) for the EMA snapshots ckpt-<step>.safetensors the
           budget lists (seed 0 only): the learning curves

The result is written to <out_dir>/result.json and reused when the recipe is unchanged; an
interrupted training resumes exactly from its last checkpoint (`st train --resume auto`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

MMD_WIDTHS = (0.1, 1.0)  # kernel widths h: the mode shape (mode_std 0.1) and the mode layout


def run_job(job, classifier: Path | None) -> dict:
    """Train and evaluate `job` (a variants.Job) in this process, output logged to a file."""
    torch.set_num_threads(1)
    recipe = job.recipe()
    done = _cached(job.out_dir / "result.json", recipe.to_dict())
    if done:
        return done
    resume = _resumable(job.out_dir, recipe)
    if not resume:
        shutil.rmtree(job.out_dir, ignore_errors=True)
    job.out_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path(job), "a") as log, contextlib.redirect_stdout(log):
        result = _train_and_measure(job, recipe, classifier, resume)
    (job.out_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def log_path(job) -> Path:
    """The job's training output, beside its run folder (st train refuses a folder holding
    files of its own before the first run)."""
    return job.out_dir.with_name(f"{job.out_dir.name}.log")


def _cached(path: Path, recipe: dict) -> dict | None:
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("recipe") == recipe:
            return result
    return None


def _resumable(out_dir: Path, recipe) -> bool:
    """A checkpoint of this very recipe (an interrupted run): continue it instead of restarting."""
    from stcli.components.loading import open_checkpoint
    from stcli.infra.errors import UserError
    from stcli.jobs.rundir import check_compatible

    ckpt = out_dir / "ckpt.safetensors"
    if not ckpt.is_file() or (out_dir / "result.json").is_file():
        return False
    try:
        opened = open_checkpoint(ckpt)
    except UserError:  # a damaged file from a killed write: start afresh
        return False
    if opened.step > recipe.train.steps:  # trained past this job's budget: not its run
        return False
    saved = opened.recipe
    # the resume's own rule (run settings such as out_dir may differ: a relative or absolute
    # --out is the same run), so a path spelling never deletes a run's hours
    try:
        check_compatible(saved, recipe, ckpt)
    except UserError:
        return False
    return True


def _train_and_measure(job, recipe, classifier: Path | None, resume: bool) -> dict:
    from stcli.components.loading import open_checkpoint
    from stcli.jobs.train import train

    t0, c0 = time.perf_counter(), time.process_time()
    ckpt = job.out_dir / "ckpt.safetensors"
    if resume and open_checkpoint(ckpt).step >= recipe.train.steps:  # trained, not yet measured
        loss = json.loads((job.out_dir / "log.jsonl").read_text().splitlines()[-1])["loss"]
    else:
        loss = train(recipe, resume="auto" if resume else False).loss
    t1, c1 = time.perf_counter(), time.process_time()
    result = {"data": job.data.key, "variant": job.variant.key, "label": job.variant.label,
              "seed": job.seed, "recipe": recipe.to_dict(), "command": job.command(),
              "final_loss": loss, "train_s": t1 - t0, "train_cpu_s": c1 - c0, "resumed": resume,
              # the training's wall time over every session (the checkpoint's clock): the cost
              # of a job resumed on another machine, whose train_s counts the last part only
              "train_wall_total_s": open_checkpoint(ckpt).meta.get("wall_s")}
    result.update(measure(ckpt, job.data, job.budget, job.out_dir / "samples", classifier))
    for name, spec in list(job.budget.samplers.items())[1:]:
        t, c = time.perf_counter(), time.process_time()
        samples = draw(ckpt, job.budget.n_samples, spec, job.out_dir / f"samples_{name}")
        result.update({f"{k}_{name}": v for k, v in quality(samples, job.data, classifier).items()})
        result[f"sample_s_{name}"] = time.perf_counter() - t
        result[f"sample_cpu_s_{name}"] = time.process_time() - c
    t2 = time.perf_counter()
    result["curve"] = [measure(job.out_dir / f"ckpt-{s}.safetensors", job.data, job.budget,
                               job.out_dir / f"samples-{s}", classifier) | {"step": s}
                       for s in job.curve_steps]
    result["curve_s"] = time.perf_counter() - t2
    result["eval_s"] = time.perf_counter() - t1
    result["eval_cpu_s"] = time.process_time() - c1  # one thread: core-seconds
    return result


def measure(ckpt: Path, data, budget, sample_dir: Path, classifier: Path | None) -> dict:
    """NLL, NELBO and the first sampler's sample quality of one checkpoint."""
    t, c = time.perf_counter(), time.process_time()
    out = likelihood(ckpt, data, budget)
    spec = next(iter(budget.samplers.values()))
    out.update(quality(draw(ckpt, budget.n_samples, spec, sample_dir), data, classifier,
                       budget.nll_limit))
    out["measure_s"], out["measure_cpu_s"] = time.perf_counter() - t, time.process_time() - c
    return out


def likelihood(ckpt: Path, data, budget) -> dict:
    """NLL after correction and NELBO with residual (bits/dim), mean and s.e. over test items."""
    from stcli.jobs.nll import NllOptions, evaluate

    b = budget
    opts = NllOptions(split="test", limit=b.nll_limit, batch_size=128, correction="after",
                      divergence=data.divergence, rtol=b.nll_tol, atol=b.nll_tol,
                      nelbo=True, nelbo_samples=b.nelbo_samples, device="cpu", seed=0)
    res = evaluate(ckpt, opts)
    summary = res.summary()
    return {"nll": summary["nll_after"], "nelbo": summary["nelbo_residual"],
            "nelbo_no_residual": summary["nelbo"], "nll_nfe": sum(res.nfe) / len(res.nfe),
            "nll_s": res.seconds, "nelbo_items": res.bpd["nelbo_residual"].tolist()}


def draw(ckpt: Path, n: int, sampler: dict, out: Path) -> torch.Tensor:
    """`st sample CKPT -n N [--sampler ...] --format npz`: the samples as a tensor."""
    import numpy as np

    from stcli.jobs.sample import generate

    out = generate(ckpt, n, out, fmt="npz", device="cpu", sampler=sampler, batch_size=500,
                   overwrite=True)
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        return torch.from_numpy(z["arr_0"])


def quality(samples: torch.Tensor, data, classifier: Path | None, limit: int | None = None) -> dict:
    """FID (digits) or MMD² (toy2d, with the data entropy of the first `limit` test items)."""
    if data.quality == "FID":
        return digits_quality(samples, classifier)
    return toy_quality(samples, data.recipe_obj(), limit)


def digits_quality(samples: torch.Tensor, classifier: Path, bootstrap: int = 200) -> dict:
    """FID of uint8 samples (N, H, W, C) against the digits train split, and its bootstrap
    standard error over the samples (the reference features held fixed)."""
    import digits_fid as dfid

    ext = dfid.extractor(classifier)
    ref = dfid.features(dfid.digit_split("train")[0], ext)
    feats = dfid.features(samples.permute(0, 3, 1, 2).contiguous(), ext)
    return {"fid": dfid.fid(feats, ref), "fid_se": dfid.fid_bootstrap_se(feats, ref, bootstrap),
            "n_samples": len(samples)}


def toy_quality(samples: torch.Tensor, recipe, limit: int | None = None) -> dict:
    """MMD^2 to the exact mixture at each kernel width with its standard error (from 8 disjoint
    blocks); with `limit`, also the exact data -log p on the first `limit` test items (their
    mean estimates the entropy, the NLL's floor)."""
    import gmm_mmd

    gmm = recipe.data.gmm_params()
    out = {"n_samples": len(samples)}
    for h in MMD_WIDTHS:
        out[f"mmd2_h{h:g}"] = gmm_mmd.mmd2(samples.double(), gmm, h)
        out[f"mmd2_h{h:g}_se"] = gmm_mmd.mmd2_block_se(samples.double(), gmm, h)
    if limit:
        test = recipe.data.create("test").data[:limit]
        entropy = -gmm_mmd.data_logp(test.double(), gmm)
        out["data_entropy_bpd"] = float(entropy.mean()) / (2 * math.log(2))
    return out
