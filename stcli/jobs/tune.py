"""`st tune-steps CKPT`: the time grid on which a few-step sampler comes closest to the
converged probability flow of this model (the math: `stcli.components.samplers.tuning`).

From `calib` prior draws the converged flow is solved once (adaptive dopri5 at `ref_tol`); the
sampler is run on each schedule (uniform, log_snr, edm), the best is warped by compass search,
and the grid found is checked on `check` other draws that the search never saw.  The result is
a `sample:` section (the sampler's settings and its `times`) for a recipe or for
`st sample --sampler-file`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from stcli.components.loading import load_model
from stcli.components.samplers.tuning import KNOTS, compass_search, rmse, warped_times
from stcli.infra import checkpoint
from stcli.infra.console import console, info
from stcli.infra.distributed import pick_device
from stcli.infra.errors import UserError
from stcli.infra.outputs import write_result
from stcli.infra.registry import SAMPLERS
from stcli.infra.seeding import generator

TUNABLE = ("unipc", "dpm2m", "euler", "heun")  # deterministic, on a grid: an error to the flow
GRIDS = ("uniform", "log_snr", "edm")
RESERVED = ("steps", "schedule", "rho", "times", "denoise")  # set by the search, not by the user


@dataclass(frozen=True)
class TuneOptions:
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "unipc"})
    steps: int = 10
    calib: int = 64  # prior draws the grid is tuned on
    check: int = 64  # other prior draws it is checked on
    ref_tol: float = 1e-5  # rtol = atol of the reference dopri5 solve
    budget: int = 150  # sampler runs of the search
    weights: str = "ema"
    seed: int = 0
    device: str = "auto"


def sampler_spec(settings: dict[str, Any], steps: int, **grid: Any):
    """The sampler of `settings` on `steps` steps of `grid` (a schedule or times), no denoising
    (the error is measured at eps)."""
    name = settings.get("name", "unipc")
    if name not in TUNABLE:
        raise UserError(f"st tune-steps tunes the grid of {', '.join(TUNABLE)}, not {name!r} "
                        "(a stochastic or adaptive sampler has no error to the flow to tune)")
    fields = SAMPLERS.spec(name).model_fields
    unknown = sorted(k for k in settings if k not in fields)
    if unknown:
        raise UserError(f"sampler {name!r} has no option {', '.join(unknown)}")
    fixed = sorted(k for k in settings if k in RESERVED)
    if fixed:
        raise UserError(f"{', '.join(fixed)} cannot be a --setting: the search sets the grid "
                        "(--steps) and measures without denoising (st sample adds it)")
    params = {k: v for k, v in settings.items() if k != "name"}
    return SAMPLERS.validate(name, **params, steps=steps, denoise=False, **grid)


def prior_draws(sde, shape, n: int, seed: int, device) -> torch.Tensor:
    """n prior draws x_T, draw i from its own generator (seed, "tune", i)."""
    return torch.stack([sde.prior_sample(shape, generator=generator(device, seed, "tune", i),
                                         device=device) for i in range(n)])


def tune_steps(ckpt: str | Path, opts: TuneOptions) -> dict[str, Any]:
    """The tuned sampler section and the errors of every grid on both sets of draws."""
    if opts.steps < 2 or opts.calib < 1 or opts.check < 0 or opts.budget < 1 or not opts.ref_tol > 0:
        raise UserError("--steps must be at least 2, --calib, --budget and --ref-tol positive, "
                        "--check not negative")
    for settings in candidates(opts.sampler, opts.steps):  # refuse bad settings before loading
        sampler_spec(settings, opts.steps, schedule="edm")
    device = pick_device(opts.device)
    loaded = load_model(ckpt, opts.weights, device)
    sde, shape, score = loaded.recipe.sde, loaded.recipe.data.shape, loaded.model.score
    x = prior_draws(sde, shape, opts.calib + opts.check, opts.seed, device)
    info(f"reference: dopri5 at {opts.ref_tol:g} on {len(x)} prior draws")
    ref, ref_nfe = SAMPLERS.validate("ode", rtol=opts.ref_tol, atol=opts.ref_tol,
                                     denoise=False)(score, sde, x)
    sets = {"calib": slice(0, opts.calib), "check": slice(opts.calib, None)}

    def error(spec, part: str) -> float:
        """RMSE on one set of draws (inf where the sampler diverges; nan for an empty set)."""
        s = sets[part]
        if s.start == len(x):
            return float("nan")
        e = rmse(spec.integrate(score, sde, x[s], None)[0], ref[s])
        return e if math.isfinite(e) else float("inf")

    tried = [search(settings, opts, sde, error) for settings in candidates(opts.sampler, opts.steps)]
    best = min(tried, key=lambda t: t["calib_rmse"])
    spec = best["spec"]
    if len(tried) > 1:
        info(f"order {spec.order}: the lower error on the calibration draws")
    rows = []
    for t in tried:
        label = f"order {t['spec'].order}, " if len(tried) > 1 else ""
        rows += [{"grid": label + g, "calib_rmse": e, "check_rmse": error(t["specs"][g], "check")}
                 for g, e in t["fixed"].items()]
        rows.append({"grid": f"{label}tuned ({t['base']}, warped)", "calib_rmse": t["calib_rmse"],
                     "check_rmse": error(t["spec"], "check")})
    nfe = spec.nfe(sde)  # without denoise, as searched
    section = spec.model_dump(mode="json", exclude={"denoise"}) | {"schedule": best["base"]}
    return {"ckpt": str(ckpt), "ckpt_sha256": checkpoint.file_sha256(ckpt), "step": loaded.step,
            "sampler": section, "nfe": nfe, "rows": rows, "base": best["base"], "warp": best["warp"],
            "search_runs": sum(t["runs"] for t in tried), "ref_nfe": ref_nfe,
            "ref_tol": opts.ref_tol, "calib": opts.calib, "check": opts.check, "seed": opts.seed}


def candidates(settings: dict[str, Any], steps: int) -> list[dict[str, Any]]:
    """The settings searched: unipc without an order tries orders 2 and 3 (the better one
    depends on the model and the step count), where the steps reach them."""
    if settings.get("name", "unipc") != "unipc" or "order" in settings:
        return [settings]
    reachable = [k for k in (2, 3) if _reaches(settings, steps, k)]
    if not reachable and _reaches(settings, steps, 1):  # 2 steps: order 1, the one they reach
        reachable = [1]
    return [settings | {"order": k} for k in reachable] or [settings]


def _reaches(settings: dict[str, Any], steps: int, order: int) -> bool:
    try:
        sampler_spec(settings | {"order": order}, steps, schedule="edm")
    except UserError:
        return False
    return True


def search(settings: dict[str, Any], opts: TuneOptions, sde, error) -> dict[str, Any]:
    """The best schedule for `settings` on the calibration draws, then its warp by compass
    search: the schedules' errors, the base, the warp, its error and the tuned spec."""
    specs = {g: sampler_spec(settings, opts.steps, schedule=g) for g in GRIDS}
    fixed = {g: error(spec, "calib") for g, spec in specs.items()}
    base = min(fixed, key=lambda g: (not math.isfinite(fixed[g]), fixed[g]))
    if not math.isfinite(fixed[base]):
        raise UserError(f"{settings.get('name', 'unipc')} with {opts.steps} steps diverges on "
                        f"every schedule ({', '.join(GRIDS)}) for this model: nothing to tune")

    def tuned(c: list[float]):
        return sampler_spec(settings, opts.steps,
                            times=warped_times(sde, opts.steps, base, specs[base].rho, c))

    order = f" (order {settings['order']})" if "order" in settings else ""
    info(f"tuning the {base} grid{order}, the best of {', '.join(GRIDS)}, on {opts.calib} draws")
    c, best, runs = compass_search(lambda c: error(tuned(c), "calib"), [0.0] * (KNOTS - 1),
                                   budget=opts.budget)
    return {"specs": specs, "fixed": fixed, "base": base, "warp": c, "calib_rmse": best,
            "runs": runs, "spec": tuned(c)}


def _rmse(value: float) -> str:
    """An RMSE for the table: "-" for an empty set of draws (nan), "inf" where it diverged."""
    return "-" if math.isnan(value) else f"{value:.4g}"


def to_yaml(result: dict[str, Any]) -> str:
    """The sampler section, headed by comments saying where it comes from."""
    head = [f"# st tune-steps {result['ckpt']} (step {result['step']}, sha256 "
            f"{result['ckpt_sha256'][:16]}...): {result['sampler']['name']}, "
            f"{result['nfe']} evaluations (+1 with denoise)",
            "# RMSE of x_eps to the converged flow (calibration draws / other draws):"]
    head += [f"#   {r['grid']}: {_rmse(r['calib_rmse'])} / {_rmse(r['check_rmse'])}" for r in result["rows"]]
    head.append("# use: st sample CKPT --sampler-file THIS_FILE, or paste under `sample:` in a recipe")
    return "\n".join(head) + "\n" + yaml.safe_dump(result["sampler"], sort_keys=False)


def write(result: dict[str, Any], out: Path) -> None:
    write_result(out, to_yaml(result), "sampler section")


def report(result: dict[str, Any], out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"{result['sampler']['name']}, {result['nfe']} NFE: RMSE of x_eps to the "
                        "converged flow")
    for col in ("grid", f"{result['calib']} calibration draws", f"{result['check']} other draws"):
        table.add_column(col, justify="left" if col == "grid" else "right")
    for r in result["rows"]:
        table.add_row(r["grid"], _rmse(r["calib_rmse"]), _rmse(r["check_rmse"]))
    console.print(table)
    info(f"wrote {out}: st sample {result['ckpt']} --sampler-file {out} -n N")
