"""The `st` command line: parses, validates, and calls one function per subcommand.

User errors (UserError, bad options) print one clear message and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Annotated, Literal, Optional

import typer

from stcli.infra.console import error, info
from stcli.infra.errors import TrainingStopped, UserError
from stcli.jobs.helptext import epilog

_ARGV: list[str] = []  # this invocation's arguments, for the --procs relaunch
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate score-based diffusion models with Soft Truncation.")
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect and check recipes.")
app.add_typer(recipe_app, name="recipe")
data_app = typer.Typer(no_args_is_help=True, help="Prepare data sets from their official releases.")
app.add_typer(data_app, name="data")

# Options with a fixed set of values are Literal types: the parser checks them (another value is
# a usage error, exit code 2) and --help lists them.  tests/test_cli_help.py checks that each
# equals the set its module accepts.
WeightsName = Literal["ema", "raw"]
Predictor = Literal["euler_maruyama", "reverse_diffusion", "ancestral"]
Corrector = Literal["langevin", "none"]
Schedule = Literal["uniform", "log_snr", "edm"]
Format = Literal["png", "npz"]
Precision = Literal["fp32", "bf16"]
Correction = Literal["after", "before"]
Divergence = Literal["rademacher", "gaussian", "exact"]
TimeVariable = Literal["t", "lambda", "lambda_scaled"]
ErrorNorm = Literal["rms", "rms_per_part"]
Protocol = Literal["default", "paper", "fast"]
Resize = Literal["tf", "clean"]
Dtype = Literal["fp32", "fp16", "bf16"]
ExportFormat = Literal["st", "diffusers"]
TuneSampler = Literal["unipc", "dpm2m", "euler", "heun"]
SAMPLER_PLACEHOLDER = Literal["(the registered samplers)"]  # set by `_command` from SAMPLERS

Weights = Annotated[WeightsName, typer.Option("--weights", help="Checkpoint weights: ema or raw.")]
Sampler = Annotated[Optional[SAMPLER_PLACEHOLDER], typer.Option(
    "--sampler", show_default=False,
    help="Sampler (default: the checkpoint's recipe's).")]
Procs = Annotated[int, typer.Option(
    "--procs", min=1, help="Processes on this node (relaunches itself through torchrun).")]
RecipeArg = Annotated[str, typer.Argument(help="Path of a YAML recipe.", metavar="RECIPE")]
TrainArg = Annotated[str, typer.Argument(
    help="Path of a YAML recipe, or a run folder (runs/NAME) to resume from its recipe.yaml.",
    metavar="RECIPE|RUN_DIR")]
Overrides = Annotated[Optional[list[str]], typer.Argument(
    help="Dotted overrides key.path=value (values parsed as YAML), e.g. train.steps=100.",
    metavar="[KEY=VALUE]...", show_default=False)]


def _print_version(value: bool) -> None:
    if value:
        from stcli.infra.version import __version__

        info(f"st {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_print_version, help="Print st's version and exit.")] = False):
    pass


@app.command(epilog=epilog("train"))
def train(
    recipe: TrainArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in train.out_dir from its ckpt.safetensors. "
        "`--resume auto`: continue if the run folder holds a checkpoint, else start afresh "
        "(a requeued job runs the same command).")] = False,
    resume_auto: Annotated[bool, typer.Option("--resume-auto", hidden=True)] = False,
    data_changed: Annotated[bool, typer.Option(
        "--data-changed", help="Resume although the training data differs from the one the "
        "checkpoint records (e.g. a damaged image removed); said, and the new data recorded.")] = False,
    procs: Procs = 1,
):
    """Train a score model from RECIPE (Soft Truncation, EMA, checkpoints, sample grids), or
    continue the run in a run folder (runs/NAME) from its recipe.yaml and checkpoint."""
    from pathlib import Path

    from stcli.components.recipe import load_recipe

    resume = "auto" if resume_auto else resume
    if Path(recipe).is_dir():  # a run folder: its stored recipe, resumed
        from stcli.jobs.rundir import load_run_folder

        spec, resume = load_run_folder(Path(recipe), list(overrides or [])), resume or True
    else:
        spec = load_recipe(recipe, overrides)  # validate before spawning anything
    _relaunch_if_asked(procs)
    from stcli.jobs.train import train as run_training

    result = run_training(spec, resume=resume, data_changed=data_changed)
    if result.step and _is_rank0():
        info(f"done: step {result.step}, loss {result.loss:.4g}; "
             f"checkpoint {result.out_dir / 'ckpt.safetensors'}")


@recipe_app.command("show")
def recipe_show(
    recipe: RecipeArg,
    overrides: Overrides = None,
    params: Annotated[bool, typer.Option("--params", help="Also print the net's parameter count.")] = False,
    cost: Annotated[bool, typer.Option("--cost", help="Also print FLOPs and memory of a training "
                                       "step on one device (docs/cost.md).")] = False,
    gpu: Annotated[Optional[str], typer.Option("--gpu", help="Also the times of a step, the run and "
                                               "an FID on this GPU (implies --cost): A100 (80 GB), "
                                               "A100-40GB, H100, V100 or L40S.")] = None,
):
    """Print the resolved recipe (every default filled in), validated."""
    from stcli.components.recipe import load_recipe

    spec = load_recipe(recipe, overrides)
    device = None
    if gpu is not None:
        from stcli.jobs.cost import gpu as find_gpu

        device = find_gpu(gpu)  # before any output: an unknown name is the only message
    info(spec.to_yaml().rstrip())
    if params:
        info(f"# net parameters: {count_parameters(spec):,}")
    if cost or device is not None:
        from stcli.jobs import cost as costs

        counted = costs.count(spec)
        timed = costs.timing(counted, device) if device is not None else None
        info("\n".join(f"# {line}" for line in costs.lines(counted, timed)))


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, overrides: Overrides = None):
    """Check RECIPE; exit code 0 if it is valid, 2 with the offending fields if not."""
    from stcli.components.recipe import load_recipe

    spec = load_recipe(recipe, overrides)
    count_parameters(spec)  # builds the net's shapes (on the meta device, no weights)
    info(f"{recipe}: valid ({spec.name})")


@data_app.command("prepare", epilog=(
        "Examples:\n  st data prepare celeba --from ~/Downloads --out data/celeba\n"
        "  st data prepare imagenet32 --from ~/Downloads --out data/imagenet32\n"
        "  st data prepare celebahq --from ~/celebahq-1024 --out data/celebahq --size 256\n\n"
        "More: docs/components.md#datasets-stclicomponentsdatapy"))
def data_prepare(
    name: Annotated[str, typer.Argument(help="celeba | imagenet32 | celebahq.", metavar="NAME")],
    source: Annotated[str, typer.Option(
        "--from", help="The downloaded release: an archive (img_align_celeba.zip, "
        "train_32x32.tar, ...) or the folder holding it; celebahq: the folder of its images.")],
    out: Annotated[str, typer.Option("--out", help="Folder to write: the recipe's data.root.")],
    size: Annotated[Optional[int], typer.Option(
        "--size", min=1, show_default=False, help="celebahq: side of the written images "
        "(default 256; must divide the images' side).")] = None,
    workers: Annotated[int, typer.Option("--workers", min=1, help="celebahq: threads.")] = 4,
):
    """Lay out a data set's official release the way st reads it (nothing is left behind if a
    check fails)."""
    from pathlib import Path

    from stcli.infra.outputs import output_folder
    from stcli.jobs.prepare import prepare

    prepare(name, Path(source).expanduser(), output_folder(out, "--out"), size=size, workers=workers)


FidDevice = Annotated[str, typer.Option(
    "--device", help="Where features are computed (and samples drawn): auto, cpu or cuda.")]
FidBatch = Annotated[int, typer.Option(
    "--batch-size", min=1, help="Images per batch of the feature extractor (and the sampler).")]
FidCache = Annotated[str, typer.Option(
    "--cache-dir", help="Cache of reference statistics, torch-fidelity datasets and the "
    "Inception weights.")]
FidWeights = Annotated[Optional[str], typer.Option(
    "--inception-weights", envvar="ST_INCEPTION_WEIGHTS", show_default=False,
    help="Local copy of torch-fidelity's Inception weights (weights-inception-2015-12-05-"
    "6726825d.pth) for machines without network; see docs/evaluation.md.")]
FidResize = Annotated[Optional[Resize], typer.Option(
    "--resize", show_default=False, help="How images reach Inception's 299x299 input: tf "
    "(torch-fidelity's TF-compatible bilinear resize; the CIFAR-10 protocol) or clean "
    "(clean-fid's PIL bicubic). Default: a recipe's eval.fid.resize, else tf.")]
FidExtractor = Annotated[str, typer.Option(
    "--feature-extractor", help="inception-v3-compat (the standard), or st-random-64: a tiny "
    "random network for tests, whose numbers mean nothing.")]


def finite(param: typer.CallbackParam, value):
    """Reject inf and nan where a float option is read (typer accepts them)."""
    import math

    for v in value if isinstance(value, list) else [value]:
        if v is not None and not math.isfinite(v):
            raise UserError(f"{param.opts[0]} {v} is not a finite number")
    return value


def _fid_settings(device: str, batch_size: int, cache_dir: str, weights: str | None,
                  extractor: str, resize: str | None = None):
    from pathlib import Path

    from stcli.components.metrics import Settings

    return Settings(extractor=extractor, device=device, batch_size=batch_size, weights=weights,
                    cache_dir=Path(cache_dir).expanduser(), resize=resize).checked()


@app.command(epilog=epilog("fid"))
def fid(
    samples: Annotated[str, typer.Argument(
        help="Images to measure: a folder of PNG/JPG (recursive), an .npz from `st sample`, or a "
        "checkpoint (.safetensors) to sample from first.", metavar="SAMPLES")],
    ref: Annotated[Optional[str], typer.Option(
        "--ref", show_default=False, help="Reference: a torch-fidelity dataset (cifar10-train, "
        "...), a folder, an .npz, a recipe (train split), statistics from `st fid-ref` or an "
        ".npz of published mu/sigma statistics (FID only). "
        "Default for a checkpoint: its recipe's eval.fid.ref.")] = None,
    n: Annotated[Optional[int], typer.Option(
        "-n", min=1, show_default=False,
        help="Samples to draw from a checkpoint (default: its recipe's eval.fid.n).")] = None,
    isc: Annotated[bool, typer.Option("--isc", help="Also the Inception Score.")] = False,
    kid: Annotated[bool, typer.Option("--kid", help="Also the Kernel Inception Distance "
                                      "(subsets shrink to fit small sets, with a warning).")] = False,
    prc: Annotated[bool, typer.Option("--prc", help="Also precision, recall and F-score.")] = False,
    json_path: Annotated[Optional[str], typer.Option(
        "--json", show_default=False, help="Also write the results to this JSON file.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json.")] = False,
    samples_dir: Annotated[Optional[str], typer.Option(
        "--samples-dir", show_default=False, help="Keep the samples drawn from a checkpoint in "
        "this (new or empty) folder; default: a temporary folder, deleted afterwards.")] = None,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", show_default=False, help="Seed of the samples drawn (default 0).")] = None,
    sampler: Sampler = None,
    weights: Annotated[Optional[WeightsName], typer.Option(
        "--weights", show_default=False,
        help="Checkpoint weights: ema (default) or raw.")] = None,
    device: FidDevice = "auto",
    batch_size: FidBatch = 64,
    cache_dir: FidCache = "~/.cache/st/fidelity",
    inception_weights: FidWeights = None,
    feature_extractor: FidExtractor = "inception-v3-compat",
    resize: FidResize = None,
):
    """FID of SAMPLES against --ref (plus IS, KID, precision/recall on request)."""
    from pathlib import Path

    from stcli.infra.outputs import output_file
    from stcli.infra.registry import METRICS
    from stcli.jobs.fid import run_fid

    if json_path is not None:
        json_path = output_file(json_path, "--json", overwrite=overwrite, inputs=[samples],
                                make_parents=True)
    wanted = ["fid"] + [name for name, on in (("isc", isc), ("kid", kid), ("prc", prc)) if on]
    run_fid(samples, ref, metrics=[METRICS.validate(name) for name in wanted],
            settings=_fid_settings(device, batch_size, cache_dir, inception_weights,
                                   feature_extractor, resize),
            n=n, samples_dir=Path(samples_dir) if samples_dir else None,
            json_path=json_path, seed=seed, weights=weights,
            sampler=sampler)


@app.command("fid-ref")
def fid_ref(
    source: Annotated[str, typer.Argument(
        help="A recipe (.yaml: its data section), a folder of PNG/JPG, an .npz or a "
        "torch-fidelity dataset name.", metavar="DATA_RECIPE_OR_FOLDER")],
    out: Annotated[str, typer.Option("--out", help="Statistics file to write (.safetensors).")],
    split: Annotated[Optional[str], typer.Option(
        "--split", show_default=False,
        help="Split of a recipe's dataset (default train); other sources have none.")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace --out even if it holds statistics of another source.")] = False,
    device: FidDevice = "auto",
    batch_size: FidBatch = 64,
    cache_dir: FidCache = "~/.cache/st/fidelity",
    inception_weights: FidWeights = None,
    feature_extractor: FidExtractor = "inception-v3-compat",
    resize: FidResize = None,
):
    """Reference statistics (mean, covariance, pool features) of a data set, computed once."""

    from stcli.infra.outputs import output_file
    from stcli.jobs.fid import fid_ref as compute

    out = output_file(out, "--out", overwrite=True, inputs=[source])  # it replaces only statistics
    compute(source, out, split=split, overwrite=overwrite,
            settings=_fid_settings(device, batch_size, cache_dir, inception_weights,
                                   feature_extractor, resize))


@app.command(epilog=epilog("sample"))
def sample(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint written by st train (.safetensors).",
                                        metavar="CKPT")],
    n: Annotated[int, typer.Option("-n", help="Number of samples to draw.")],
    out: Annotated[str, typer.Option("--out", help="Output folder.")] = "samples",
    sampler: Sampler = None,
    steps: Annotated[Optional[int], typer.Option(
        "--steps", help="Grid steps of pc / euler / heun / dpm2m / euler_maruyama (default: the "
        "sampler's own, or the recipe's if it names the same sampler).")] = None,
    schedule: Annotated[Optional[Schedule], typer.Option(
        "--schedule", show_default=False, help="Time grid: uniform in t, log_snr (even in "
        "log sigma/mu) or edm (Karras et al.'s rho = 7 grid); default as for --steps.")] = None,
    predictor: Annotated[Optional[Predictor], typer.Option(
        "--predictor", show_default=False, help="pc predictor.")] = None,
    corrector: Annotated[Optional[Corrector], typer.Option(
        "--corrector", show_default=False, help="pc corrector.")] = None,
    snr: Annotated[Optional[float], typer.Option(
        "--snr", callback=finite, help="Signal-to-noise ratio of the Langevin corrector.")] = None,
    rtol: Annotated[Optional[float], typer.Option(
        "--rtol", callback=finite, help="Relative tolerance of the ode sampler.")] = None,
    atol: Annotated[Optional[float], typer.Option(
        "--atol", callback=finite, help="Absolute tolerance of the ode sampler.")] = None,
    denoise: Annotated[Optional[bool], typer.Option(
        "--denoise/--no-denoise", help="Final Tweedie denoising step (default: the recipe's).",
        show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch and process.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Image i uses a seed derived from (seed, i).")] = 0,
    weights: Weights = "ema",
    fmt: Annotated[Format, typer.Option(
        "--format", help="png (one file per image) or npz (one file).")] = "png",
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    precision: Annotated[Precision, typer.Option("--precision", help="bf16: autocast.")] = "fp32",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Delete samples made otherwise (another checkpoint, sampler, seed, "
        "...) in --out and start afresh; without it such a folder is refused.")] = False,
    sampler_file: Annotated[Optional[str], typer.Option(
        "--sampler-file", show_default=False, help="A sampler section (YAML, e.g. written by st "
        "tune-steps); the options above override its settings, but a file's explicit times "
        "take no --steps, --schedule or other --sampler.")] = None,
    procs: Procs = 1,
):
    """Draw N samples from CKPT into --out (resumable; image i depends only on --seed and i)."""
    from stcli.infra.outputs import output_folder
    from stcli.jobs.sample import generate, read_sampler_file

    out = output_folder(out, "--out")
    from_file = read_sampler_file(sampler_file) if sampler_file is not None else {}
    if from_file.get("times") is not None:
        clash = [opt for opt, value in (("--steps", steps), ("--schedule", schedule)) if value is not None]
        if sampler is not None and sampler != from_file["name"]:
            clash.append(f"--sampler {sampler}")
        if clash:
            raise UserError(f"--sampler-file {sampler_file} gives the {from_file['name']} sampler its "
                            f"time grid: {' and '.join(clash)} would change it; leave "
                            f"{'it' if len(clash) == 1 else 'them'} out")
    options = {"name": sampler, "steps": steps, "schedule": schedule, "predictor": predictor,
               "corrector": corrector,
               "snr": snr, "rtol": rtol, "atol": atol, "denoise": denoise}
    overrides = from_file | {k: v for k, v in options.items() if v is not None}
    _relaunch_if_asked(procs)
    generate(ckpt, n, out, sampler=overrides, batch_size=batch_size, seed=seed, weights=weights,
             fmt=fmt, device=device, precision=precision, overwrite=overwrite)


@app.command("tune-steps", epilog=epilog("tune-steps"))
def tune_steps(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint written by st train.", metavar="CKPT")],
    steps: Annotated[int, typer.Option("--steps", help="Grid steps of the sampler.")] = 10,
    sampler: Annotated[TuneSampler, typer.Option(
        "--sampler", help="The few-step sampler whose grid is tuned.")] = "unipc",
    setting: Annotated[Optional[list[str]], typer.Option(
        "--setting", show_default=False, help="A sampler setting KEY=VALUE (e.g. order=2), "
        "repeatable.")] = None,
    out: Annotated[Optional[str], typer.Option(
        "--out", show_default=False,
        help="The sampler section written (default: CKPT's folder/<sampler>-<steps>steps.yaml).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    calib: Annotated[int, typer.Option("--calib", help="Prior draws the grid is tuned on.")] = 64,
    check: Annotated[int, typer.Option(
        "--check", help="Other prior draws the tuned grid is checked on.")] = 64,
    ref_tol: Annotated[float, typer.Option(
        "--ref-tol", callback=finite, help="Tolerance of the converged reference (dopri5).")] = 1e-5,
    budget: Annotated[int, typer.Option("--budget", help="Sampler runs of the search.")] = 150,
    weights: Weights = "ema",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
):
    """The time grid on which a few-step sampler comes closest to CKPT's probability flow."""
    from pathlib import Path

    import yaml

    from stcli.components.recipe import safe_load
    from stcli.infra.outputs import output_file
    from stcli.jobs.tune import TuneOptions, report, write
    from stcli.jobs.tune import tune_steps as run_tune

    settings: dict = {"name": sampler}
    for item in setting or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--setting {item!r} is not of the form KEY=VALUE")
        if key in settings:
            raise UserError(f"--setting {item!r}: {key} is given twice (or is the sampler's "
                            "name); give each setting once")
        try:
            settings[key] = safe_load(raw)
        except yaml.YAMLError:
            raise UserError(f"--setting {item!r}: the value is not valid YAML") from None
    path = Path(out) if out is not None else Path(ckpt).parent / f"{sampler}-{steps}steps.yaml"
    path = output_file(path, "--out", overwrite=overwrite, inputs=[ckpt], make_parents=True)
    opts = TuneOptions(sampler=settings, steps=steps, calib=calib, check=check, ref_tol=ref_tol,
                       budget=budget, weights=weights, seed=seed, device=device)
    result = run_tune(ckpt, opts)
    write(result, path)
    report(result, path)


@app.command(epilog=epilog("nll"))
def nll(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint written by st train.", metavar="CKPT")],
    eps: Annotated[Optional[float], typer.Option(
        "--eps", callback=finite, show_default=False, help="Integrate the probability-flow ODE from eps to T "
        "(default: the recipe's eval.nll.eps, else its training eps).")] = None,
    correction: Annotated[Optional[Correction], typer.Option(
        "--correction", show_default=False, help="after: -log p_eps(x_eps) + R_eps (the "
        "paper's); before: -log p_eps(x0) (default: the recipe's eval.nll.correction).")] = None,
    divergence: Annotated[Optional[Divergence], typer.Option(
        "--divergence", show_default=False, help="rademacher | gaussian (Hutchinson) | exact "
        "(low dimension) (default: the recipe's eval.nll.hutchinson).")] = None,
    probes: Annotated[Optional[int], typer.Option(
        "--probes", min=1, show_default=False,
        help="Hutchinson probes averaged (default: the recipe's eval.nll.probes).")] = None,
    split: Annotated[str, typer.Option("--split", help="Data split evaluated.")] = "test",
    limit: Annotated[Optional[int], typer.Option(
        "--limit", min=1, help="Evaluate only the first N items.", show_default=False)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 128,
    repeats: Annotated[Optional[int], typer.Option(
        "--repeats", min=1, show_default=False, help="Passes over the split with fresh "
        "dequantisation noise (default: the recipe's eval.nll.repeats).")] = None,
    rtol: Annotated[Optional[float], typer.Option(
        "--rtol", callback=finite, show_default=False,
        help="ODE relative tolerance (default: the recipe's eval.nll.rtol).")] = None,
    atol: Annotated[Optional[float], typer.Option(
        "--atol", callback=finite, show_default=False,
        help="ODE absolute tolerance (default: the recipe's eval.nll.atol).")] = None,
    time_variable: Annotated[Optional[TimeVariable], typer.Option(
        "--time-variable", show_default=False, help="The ODE's integration variable (default: "
        "the recipe's eval.nll.time_variable, t).")] = None,
    error_norm: Annotated[Optional[ErrorNorm], typer.Option(
        "--error-norm", show_default=False, help="rms (over all of x and log p, scipy's) | "
        "rms_per_part (log p held to the tolerances on its own) (default: the recipe's "
        "eval.nll.error_norm, rms).")] = None,
    protocol: Annotated[Protocol, typer.Option(
        "--protocol", help="default (the recipe's eval.nll) | paper (RK45 conventions, rtol = atol "
        "= 1e-5 in t) | fast (5-10x fewer evaluations; a test-set mean within about 0.005 "
        "bits/dim, docs/likelihood.md); paper and fast take no solver option.")] = "default",
    nelbo: Annotated[bool, typer.Option(
        "--nelbo", help="Also the NELBO L(theta; g^2, eps), without and with residual.")] = False,
    nelbo_samples: Annotated[int, typer.Option(
        "--nelbo-samples", min=1, help="Monte Carlo draws of (t, z) per datum.")] = 1,
    solver_check: Annotated[int, typer.Option(
        "--solver-check", min=0, help="Items solved again at 100x tighter tolerances to estimate "
        "the solver's own error of the mean (0: none).")] = 16,
    json_path: Annotated[Optional[str], typer.Option(
        "--json", help="Write every number and the settings here.", show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --json.")] = False,
    weights: Weights = "ema",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
    procs: Procs = 1,
):
    """Bits/dim of CKPT by the probability-flow ODE (and the NELBO), mean and standard error.
    Unset options take the checkpoint recipe's eval.nll section."""

    from stcli.infra.outputs import output_file
    from stcli.jobs.nll import NllOptions, evaluate, report, solver_settings

    solver = solver_settings(protocol, time_variable, rtol, atol, error_norm)
    if json_path is not None:
        json_path = output_file(json_path, "--json", overwrite=overwrite, inputs=[ckpt],
                                make_parents=True)
    if eps is not None and not eps > 0:
        raise UserError(f"--eps must be positive, got {eps}")
    _relaunch_if_asked(procs)
    opts = NllOptions(split=split, limit=limit, batch_size=batch_size, repeats=repeats, eps=eps,
                      correction=correction, divergence=divergence, probes=probes, **solver,
                      nelbo=nelbo, nelbo_samples=nelbo_samples, solver_check=solver_check,
                      weights=weights,
                      seed=seed, device=device)
    result = evaluate(ckpt, opts)
    if _is_rank0():
        report(result, opts, ckpt, json_path)


@app.command()
def diagnose(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint written by st train.", metavar="CKPT")],
    out: Annotated[Optional[str], typer.Option(
        "--out", show_default=False,
        help="Folder for diagnose.png and diagnose.json (default: CKPT's folder/diagnose).")] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the JSON (as written to diagnose.json) instead of the table.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace diagnose.json and diagnose.png already in --out.")] = False,
    split: Annotated[str, typer.Option("--split", help="Data split the x0 come from.")] = "test",
    limit: Annotated[int, typer.Option("--limit", help="Data points x0 used at every t.")] = 256,
    points: Annotated[int, typer.Option(
        "--points", help="Times t on the log-spaced grid from eps to T (Fig. 1a).")] = 40,
    samples: Annotated[int, typer.Option(
        "--samples", help="Monte Carlo draws t ~ p_iw,tau per tau (Figs. 6a/6b).")] = 512,
    tau: Annotated[Optional[list[float]], typer.Option(
        "--tau", callback=finite, show_default=False, help="Truncation time of Fig. 6b, "
        "repeatable (eps is always included; default 1e-3, 1e-2, 1e-1).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Network batch size.")] = 256,
    weights: Weights = "ema",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")] = "auto",
):
    """The bound's integrand and the importance-weighted loss per diffusion time (Figs. 1a, 6, 7)."""
    from pathlib import Path

    from stcli.jobs.diagnose import DiagnoseOptions, check_out, report, write
    from stcli.jobs.diagnose import diagnose as run_diagnose

    opts = DiagnoseOptions(split=split, limit=limit, points=points, samples=samples,
                           taus=tuple(tau) if tau else DiagnoseOptions.taus,
                           batch_size=batch_size, weights=weights, seed=seed, device=device)
    folder = Path(out) if out is not None else Path(ckpt).parent / "diagnose"
    check_out(folder, overwrite)
    result = run_diagnose(ckpt, opts)
    files = write(result, folder)
    report(result, files, as_json)


@app.command("import", epilog=epilog("import"))
def import_(
    ckpt: Annotated[str, typer.Argument(
        help="A score_sde / Soft Truncation checkpoint (checkpoint_*.pth).", metavar="CKPT")],
    recipe: Annotated[str, typer.Option("--recipe", help="The recipe the checkpoint was trained "
                                        "with (its net, SDE and data).")],
    out: Annotated[str, typer.Option("--out", help="st checkpoint to write (.safetensors).")],
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    as_recipe: Annotated[bool, typer.Option(
        "--as-recipe", help="Keep the recipe's settings where the release computes otherwise "
        "(to fine-tune under the paper's definition); the imported function then differs from "
        "the release's.")] = False,
):
    """Convert a score_sde / Soft Truncation checkpoint (loaded without running pickled code) to
    an st checkpoint computing the released function."""

    from stcli.components.recipe import load_recipe
    from stcli.infra.console import warn
    from stcli.infra.outputs import output_file
    from stcli.jobs.importer import import_checkpoint

    spec = load_recipe(recipe, overrides)
    out = output_file(out, "--out", overwrite=overwrite, inputs=[ckpt, recipe])
    result = import_checkpoint(ckpt, spec, out, as_recipe)
    for line in result["changes"]:
        info(f"as released: {line}")
    for line in result["warnings"]:
        warn(f"--as-recipe: the imported function differs from the release's: {line}")
    info(f"imported {ckpt}: {result['tensors']} tensors, {result['parameters']:,} parameters, "
         f"step {result['step']}, EMA and raw weights -> {out}")


@app.command(epilog=epilog("export"))
def export(
    ckpt: Annotated[str, typer.Argument(help="An st checkpoint.", metavar="CKPT")],
    out: Annotated[str, typer.Option("--out", help="File to write (.safetensors); with --format "
                                     "diffusers, a folder.")],
    weights: Weights = "ema",
    dtype: Annotated[Dtype, typer.Option("--dtype", help="Floating-point type of the weights.")] = "fp32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="st: one st checkpoint file; diffusers: a folder that diffusers' "
        "UNet2DModel.from_pretrained loads, with scheduler configuration and model card.")] = "st",
):
    """Inference-only weights of CKPT plus its recipe (no optimizer state, no RNG states)."""
    if fmt == "diffusers":
        from stcli.jobs.export_diffusers import export_diffusers

        result = export_diffusers(ckpt, out, weights, dtype, overwrite)
        info(f"exported the {result['weights']} weights of {ckpt} as a diffusers UNet2DModel "
             f"({result['parameters']:,} parameters; scheduler: {result['scheduler'] or 'none'}) "
             f"-> {out}")
        return
    from stcli.jobs.export import export as run_export

    result = run_export(ckpt, out, weights, dtype, overwrite)
    info(f"exported the {weights} weights of {ckpt} as {dtype}: {result['tensors']} tensors, "
         f"{result['bytes'] / 2**20:.2f} MiB ({result['bytes'] / result['source_bytes']:.0%} of "
         f"the checkpoint) -> {out}")


def _relaunch_if_asked(procs: int) -> None:
    """With --procs N > 1 outside torchrun: run this same command in N processes, then exit."""
    from stcli.infra import distributed

    if procs > 1 and distributed.slurm_environment(os.environ):
        raise UserError("--procs starts processes on this node only; under srun start one task "
                        "per GPU instead (srun --ntasks-per-node=GPUS st ...)")
    if procs > 1 and distributed.is_launched():  # torchrun already started the processes
        raise UserError(f"--procs {procs} starts torchrun itself; under torchrun (here "
                        f"{os.environ.get('WORLD_SIZE', '?')} processes) leave it out")
    if procs > 1:
        argv, rest = [], iter(_ARGV)
        for arg in rest:
            if arg == "--procs":
                next(rest, None)
            elif not arg.startswith("--procs="):
                argv.append(arg)
        raise typer.Exit(distributed.relaunch(procs, argv))


def count_parameters(spec) -> int:
    """Parameters of the recipe's net, built on the meta device (no memory, instant)."""
    import torch

    with torch.device("meta"):
        backbone = spec.net.create(shape=spec.data.shape)
    return sum(p.numel() for p in backbone.parameters())


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _resume_auto(argv: list[str]) -> list[str]:
    """`--resume auto` (or `--resume=auto`) -> the hidden flag `--resume-auto`: a plain
    `--resume` flag stays a flag, so `--resume train.steps=N` keeps its meaning."""
    out: list[str] = []
    for arg in argv:
        if arg == "auto" and out and out[-1] == "--resume":
            out[-1] = "--resume-auto"
        else:
            out.append("--resume-auto" if arg == "--resume=auto" else arg)
    return out


def _command(argv: list[str]):
    """The command of `app`, built now: --sampler accepts the samplers registered at this time
    (a plugin's, registered before `main` runs, too), and flags show no type in --help."""
    from stcli.infra.registry import SAMPLERS

    names = Literal[tuple(SAMPLERS.names())] if set(argv[:1]) & {"sample", "fid"} else None

    def typed(command) -> None:
        for param in command.params:
            if names is not None and "--sampler" in param.opts:
                param.type_descriptor = replace(param.type_descriptor, annotation=names)
                param._runtime_param = None
            if getattr(param, "is_flag", False):  # typer would print "<bool>" beside a flag
                param.display_type_rich = lambda ctx: None
        made = command.get_help_option  # --help is made per context, not among command.params

        def help_option(ctx, made=made):
            option = made(ctx)
            if option is not None:
                option.display_type_rich = lambda ctx: None
            return option

        command.get_help_option = help_option
        for sub in getattr(command, "commands", {}).values():
            typed(sub)

    command = typer.main.get_command(app)
    typed(command)
    return command


INTERRUPTED = {  # what a Ctrl-C leaves behind, per command
    "sample": "interrupted (Ctrl-C): the images written so far are kept; the same command draws "
              "only the missing ones",
    "fid": "interrupted (Ctrl-C): nothing was measured; samples kept with --samples-dir are "
           "reused by the same command",
    "nll": "interrupted (Ctrl-C): nothing was written",
    "diagnose": "interrupted (Ctrl-C): nothing was written",
}


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer handles usage errors (exit 2); ours are turned into one message."""
    global _ARGV
    _ARGV = _resume_auto(list(sys.argv[1:] if argv is None else argv))
    try:
        _command(_ARGV)(args=_ARGV, prog_name="st")
    except UserError as err:
        rank = os.environ.get("RANK")
        error(f"[rank {rank}] {err}" if rank not in (None, "0") else str(err))
        sys.exit(2)
    except RuntimeError as err:
        from stcli.infra import distributed

        if not distributed.peer_lost(err):
            raise
        error(f"[rank {os.environ.get('RANK')}] another process of this run stopped while this "
              "one waited for it; its own message says why")
        sys.exit(1)
    except TrainingStopped as err:
        if _is_rank0():
            error(str(err))
        sys.exit(128 + err.signum)
    except SystemExit as done:
        if done.code == 130 and _is_rank0():  # typer's answer to Ctrl-C (KeyboardInterrupt)
            error(INTERRUPTED.get(_ARGV[0] if _ARGV else "", "interrupted (Ctrl-C)"))
        raise
