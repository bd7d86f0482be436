"""One job of the reproduction: train a variant, then measure NLL, NELBO and sample quality,
all through stcli's Python API (the same code as `st train`, `st nll`, `st sample`).

    NLL    `st nll CKPT --correction after --nelbo --divergence {exact|rademacher} --limit N`
           (ODE likelihood after correction, Eq. 7; NELBO with residual, Eq. 8), bits/dim
    samples `st sample CKPT -n N --sampler heun --steps S --format npz` (probability-flow ODE)
    quality digits: FID with the digit classifier of digits_fid.py against the train split;
           toy2d: MMD^2 to the exact mixture (gmm_mmd.py) at two kernel widths

The result is written to <out_dir>/result.json and reused when the recipe is unchanged.
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
    shutil.rmtree(job.out_dir, ignore_errors=True)
    job.out_dir.mkdir(parents=True)
    with open(job.out_dir / "job.log", "w") as log, contextlib.redirect_stdout(log):
        result = _train_and_measure(job, recipe, classifier)
    (job.out_dir / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _cached(path: Path, recipe: dict) -> dict | None:
    if path.is_file():
        result = json.loads(path.read_text())
        if result.get("recipe") == recipe:
            return result
    return None


def _train_and_measure(job, recipe, classifier: Path | None) -> dict:
    from stcli.train import train

    t0 = time.perf_counter()
    trained = train(recipe)
    t1 = time.perf_counter()
    ckpt = trained.out_dir / "ckpt.safetensors"
    result = {"data": job.data.key, "variant": job.variant.key, "label": job.variant.label,
              "seed": job.seed, "recipe": recipe.to_dict(), "command": job.command(),
              "final_loss": trained.loss, "train_s": t1 - t0}
    result.update(likelihood(ckpt, job))
    samples = draw(ckpt, job)
    result.update(digits_quality(samples, classifier) if job.data.key == "digits"
                  else toy_quality(samples, recipe, job.budget.nll_limit))
    result["eval_s"] = time.perf_counter() - t1
    return result


def likelihood(ckpt: Path, job) -> dict:
    """NLL after correction and NELBO with residual (bits/dim), mean and s.e. over test items."""
    from stcli.nll import NllOptions, evaluate

    b = job.budget
    opts = NllOptions(split="test", limit=b.nll_limit, batch_size=128, correction="after",
                      divergence=job.data.divergence, rtol=b.nll_tol, atol=b.nll_tol,
                      nelbo=True, nelbo_samples=b.nelbo_samples, device="cpu", seed=0)
    res = evaluate(ckpt, opts)
    summary = res.summary()
    return {"nll": summary["nll_after"], "nelbo": summary["nelbo_residual"],
            "nelbo_no_residual": summary["nelbo"], "nll_nfe": sum(res.nfe) / len(res.nfe),
            "nll_s": res.seconds}


def draw(ckpt: Path, job) -> torch.Tensor:
    """`st sample CKPT -n N --sampler heun --steps S --format npz`: the samples as a tensor."""
    import numpy as np

    from stcli.sample import generate

    out = generate(ckpt, job.budget.n_samples, job.out_dir / "samples", fmt="npz", device="cpu",
                   sampler={"name": "heun", "steps": job.budget.sampler_steps}, batch_size=500)
    with np.load(out / "samples.npz", allow_pickle=False) as z:
        return torch.from_numpy(z["arr_0"])


def digits_quality(samples: torch.Tensor, classifier: Path) -> dict:
    """FID of uint8 samples (N, H, W, C) against the digits train split."""
    import digits_fid as dfid

    ext = dfid.extractor(classifier)
    ref = dfid.features(dfid.digit_split("train")[0], ext)
    feats = dfid.features(samples.permute(0, 3, 1, 2).contiguous(), ext)
    return {"fid": dfid.fid(feats, ref), "n_samples": len(samples)}


def toy_quality(samples: torch.Tensor, recipe, limit: int) -> dict:
    """MMD^2 to the exact mixture at each kernel width, and, for reference, the exact data
    -log p on the same test items as the NLL (their mean estimates the entropy, the NLL's floor)."""
    import gmm_mmd

    gmm = recipe.data.gmm_params()
    test = recipe.data.create("test").data[:limit]
    entropy = -gmm_mmd.data_logp(test.double(), gmm)
    return {**{f"mmd2_h{h:g}": gmm_mmd.mmd2(samples.double(), gmm, h) for h in MMD_WIDTHS},
            "n_samples": len(samples),
            "data_entropy_bpd": float(entropy.mean()) / (2 * math.log(2))}
