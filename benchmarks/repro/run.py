"""Reproduce the Soft Truncation paper's findings at small scale on 2 CPU cores: Table 4 (and
Table 7's P_k on toy2d) with several seeds, and Figs. 1a, 6a-c and 7.

    python benchmarks/repro/run.py              # full run (docs/reproduction.md); docs/img/
    python benchmarks/repro/run.py --quick      # tiny budgets (< 5 min); runs/repro-quick/
    python benchmarks/repro/run.py --dry-run    # build every recipe and component; train nothing
    python benchmarks/repro/run.py --data digits --converge --extras   # each loss to convergence

Jobs run in `--jobs` worker processes (default 2) with one thread each; a job whose
result.json matches its recipe is not run again (`--force` reruns everything).  Writes
<out>/results.json (every number), <out>/tables.md, <out>/diagnose/<loss>/ and the PNGs.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per worker

import numpy as np  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402
from until_converged import at_steps, keep, pilot_and_result, seed_job, settled  # noqa: E402
from variants import DATASETS, ROOT, Job, Plan  # noqa: E402

DIAG_LOSSES = ("g2", "var", "g2P1", "st_P1", "st_P0.9")
QUALITY = {"digits": ("fid", "FID (digit CNN), Heun 35 NFE"),
           "toy2d": ("mmd2_h0.1", "MMD² (h = 0.1), Heun 35 NFE"),
           "toy2d_stf": ("mmd2_h0.1", "MMD² (h = 0.1)"), "toy2d_eps": ("mmd2_h0.1", "MMD² (h = 0.1)")}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline in < 5 min")
    p.add_argument("--dry-run", action="store_true", help="build every recipe/component, no training")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (one thread each)")
    p.add_argument("--data", nargs="+", default=["toy2d", "digits"],
                   choices=["digits", "toy2d", "toy2d_stf", "toy2d_eps"],
                   help="not in the default run: toy2d_stf (Stable Target Field on the mixture), "
                   "toy2d_eps (Table 6, the epsilon sweep)")
    p.add_argument("--out", type=Path, help="output folder (default runs/repro or runs/repro-quick)")
    p.add_argument("--img", type=Path, help="figure folder (default docs/img, or <out>/img if --quick)")
    p.add_argument("--extras", action="store_true",
                   help="also Table 7's P0 and P2 on toy2d (after everything else; beyond the 3-hour budget)")
    p.add_argument("--losses", nargs="+", metavar="KEY",
                   choices=sorted({v.key for d in DATASETS.values() for v in d.variants + d.extras}),
                   help="only these losses (e.g. st_P0 st_P2 with --extras); then the tables and "
                   "curves are rebuilt from every saved result, as --report does")
    p.add_argument("--converge", action="store_true",
                   help="train each loss until its seed 0 converges (until_converged.py), then the "
                   "other seeds to that step; data sets with a converge budget (digits)")
    p.add_argument("--keep", action="store_true",
                   help="no jobs: copy the unfinished --converge jobs' checkpoints to "
                   "benchmarks/repro/state (commit them; the next machine resumes from them)")
    p.add_argument("--force", action="store_true", help="rerun jobs even if their results exist")
    p.add_argument("--report", action="store_true",
                   help="no jobs: the tables and curves from the saved results (<results>/<data>.json)")
    p.add_argument("--results", type=Path, help="per-job results, one JSON file per data set, "
                   "written as jobs finish (default benchmarks/repro/results, or <out>/results if --quick)")
    args = p.parse_args(argv)
    args.results = args.results or (ROOT / "runs" / "repro-quick" / "results" if args.quick
                                    else HERE / "results")
    args.out = args.out or ROOT / "runs" / ("repro-quick" if args.quick else "repro")
    args.img = args.img or (args.out / "img" if args.quick else ROOT / "docs" / "img")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    if args.converge:
        args.data = [d for d in args.data if DATASETS[d].converge is not None]
    plan = Plan(args.quick, args.out, tuple(args.data), args.extras,
                tuple(args.losses) if args.losses else None, args.converge)
    if args.dry_run:
        return dry_run(plan)
    if args.report:
        return report_only(args)
    if args.keep:
        kept = keep(plan.jobs, args.results)
        print("\n".join(f"kept {p.relative_to(ROOT)} ({p.stat().st_size / 2**20:.1f} MiB)" for p in kept))
        return {"kept": [str(p) for p in kept]}
    torch.set_num_threads(1)
    os.chdir(ROOT)  # the recipes' train.out_dir are relative to the repository root
    if args.force:
        for sub in ("jobs", "classifier"):
            shutil.rmtree(args.out / sub, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"quick": args.quick, "figures": sde_figures(args.img)}
    classifier = prepare_classifier(args.out, summary) if "digits" in args.data else None
    run = converge_jobs if args.converge else run_jobs
    results = run(plan.jobs, classifier, args.jobs, args.results)
    if args.losses or args.converge:  # a part of the plan: the figures come from every saved result
        return report_only(args)
    summary["diagnose"] = diagnose_checkpoints(plan, args)
    sample_figures(plan, args)
    summary.update(tables(results, args))
    summary["learning_curves"] = curve_figures(results, args)
    summary["wall_s"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps({**summary, "runs": results}, indent=1))
    print(f"\ntotal wall time {summary['wall_s'] / 60:.1f} min; results in {args.out}")
    return summary


# --- dry run -------------------------------------------------------------------------------------
def dry_run(plan: Plan) -> dict:
    """Build each job's recipe, data, net, truncation, loss (one forward, no backward) and
    sampler, the digit classifier and the mixture; print the equivalent `st train` commands."""
    import digits_fid

    from stcli.components.nets import build_score_model
    from stcli.jobs.sample import resolve_sampler

    built = []
    for job in plan.jobs:
        recipe = job.recipe()
        x0 = recipe.data.transform(torch.stack([recipe.data.create("train")[i] for i in range(4)]))
        model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                                  recipe.data.zero_centered)
        tau = recipe.truncation.sample(torch.Generator().manual_seed(0))
        with torch.no_grad():
            loss = recipe.loss(model, recipe.sde, x0, tau, generator=torch.Generator().manual_seed(0),
                               reference=x0)  # the batch as its own reference (a target may need one)
        for spec in job.budget.samplers.values():
            resolve_sampler(recipe.sample, spec)
        if job.data.key.startswith("toy2d"):
            recipe.data.gmm_params()
        assert torch.isfinite(loss).all(), job.command()
        built.append(job.command())
        print(job.command())
    digits_fid.extractor(None)
    print(f"dry run: {len(built)} jobs built")
    return {"built": built}


# --- the steps -----------------------------------------------------------------------------------
def sde_figures(img: Path) -> dict:
    import figures

    quantiles = figures.fig7_quantiles(img / "repro_fig7_quantiles.png")
    mass = figures.fig6c_lambda_P(img / "repro_fig6c_lambda_P.png")
    print(f"Fig. 7 quartiles of t_iw (VP): {quantiles}")
    for label, below in mass.items():
        print(f"Fig. 6c {label}: " + ", ".join(f"P(t <= {x}) = {p:.3f}" for x, p in below.items()))
    return {"fig7_quantiles": quantiles, "fig6c_mass_below": mass}


def prepare_classifier(out: Path, summary: dict) -> Path:
    import digits_fid

    path = out / "classifier" / "digits_cnn.safetensors"
    info = path.with_suffix(".json")
    if not (path.is_file() and info.is_file()):
        info.parent.mkdir(parents=True, exist_ok=True)
        stats = digits_fid.train_classifier(path)
        ext = digits_fid.extractor(path)
        feats = {s: digits_fid.features(digits_fid.digit_split(s)[0], ext) for s in ("train", "test")}
        stats["fid_test_vs_train"] = digits_fid.fid(feats["test"], feats["train"])
        info.write_text(json.dumps(stats))
    summary["classifier"] = json.loads(info.read_text())
    print(f"digit classifier: {summary['classifier']}")
    return path


def _worker_init() -> None:
    torch.set_num_threads(1)


def _pool(n: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init)


def run_jobs(jobs: list[Job], classifier: Path | None, n: int, saved: Path) -> list[dict]:
    """Every job in n workers, in the plan's order (data set by data set, seed-major); one line
    per finished job, whose result is added to `saved`/<data>.json at once."""
    from evaluate import run_job

    results = []
    with _pool(n) as pool:
        futures = {pool.submit(run_job, job, classifier): job for job in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            r = fut.result()
            _report_job(i, len(jobs), r)
            results.append(r)
            save_results(saved, r)
    return sorted(results, key=lambda r: (r["data"], r["variant"], r["seed"]))


def converge_jobs(jobs: list[Job], classifier: Path | None, n: int, saved: Path) -> list[dict]:
    """Every loss's pilot (its seed-0 job) first, each trained until it converges; as a pilot
    ends, its row is saved and the loss's other seeds start, trained to the pilot's budget.  Of
    pilots settled in an earlier session, the seeds of converged ones go first, those of pilots
    stopped at the cap after every pilot.  A seed whose row is in <saved>/<data>.json at its
    pilot's budget (measured on another machine, whose run folders are gone) is not rerun."""
    results = []

    def measured(job: Job, budget: int) -> bool:
        table = saved / f"{job.data.key}.json"
        rows = json.loads(table.read_text())["runs"] if table.is_file() else []
        return any((r["variant"], r["seed"], r["recipe"]["train"]["steps"]) ==
                   (job.variant.key, job.seed, budget) for r in rows)

    def seeds(job: Job, budget: int) -> dict:
        return {pool.submit(seed_job, at_steps(other, budget), classifier): other
                for other in jobs if other.variant == job.variant and other.seed != 0
                and not measured(other, budget)}

    with _pool(n) as pool:
        waiting = {}
        pilots = [(j, settled(j, saved)) for j in jobs if j.seed == 0]
        done = sorted(((j, b) for j, b in pilots if b is not None), key=lambda p: p[1])
        capped = [(j, b) for j, b in done if b >= j.budget.steps]  # not converged: after the pilots
        for job, budget in [p for p in done if p not in capped]:
            print(f"pilot {job.variant.key}: settled at {budget} steps (saved)", flush=True)
            waiting |= seeds(job, budget)
        waiting |= {pool.submit(pilot_and_result, j, classifier, saved): j for j, b in pilots if b is None}
        for job, budget in capped:
            print(f"pilot {job.variant.key}: not converged at its cap, {budget} steps (saved)", flush=True)
            waiting |= seeds(job, budget)
        while waiting:
            fut = next(as_completed(waiting))
            job = waiting.pop(fut)
            if fut.exception() is not None:  # said, and the others go on (rerun to retry it)
                print(f"FAILED {job.data.key} {job.variant.key} seed {job.seed}: "
                      f"{type(fut.exception()).__name__}: {fut.exception()}", flush=True)
                continue
            if job.seed == 0:
                state, r = fut.result()
                verdict = "converged" if state["verdict"]["step"] is not None else "NOT converged"
                print(f"pilot {job.variant.key}: {verdict} at {state['budget']} steps "
                      f"(trained {state['chunks'][-1]['step'] if state['chunks'] else 0})", flush=True)
                waiting |= seeds(job, state["budget"])
            else:
                r = fut.result()
            _report_job(len(results) + 1, len(jobs), r)
            results.append(r)
            save_results(saved, r)
    return results


def _report_job(i: int, n: int, r: dict) -> None:
    score = f"FID {r['fid']:.2f}" if "fid" in r else f"MMD² {r['mmd2_h0.1']:.2e}"
    score += f" / EM {r['fid_em']:.2f}" if "fid_em" in r else \
        f" / EM {r['mmd2_h0.1_em']:.2e}" if "mmd2_h0.1_em" in r else ""
    print(f"[{i}/{n}] {r['data']} {r['variant']} seed {r['seed']} at {r['recipe']['train']['steps']} steps: "
          f"NLL {r['nll']['mean']:.4f} NELBO {r['nelbo']['mean']:.4f} {score} "
          f"(train {r['train_s']:.0f} s, eval {r['eval_s']:.0f} s)", flush=True)


def save_results(folder: Path, result: dict) -> None:
    """Add (or replace) one job's result in folder/<data>.json: what the tables are made from."""
    path = folder / f"{result['data']}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in runs if (r["variant"], r["seed"]) != (result["variant"], result["seed"])]
    runs = sorted([*runs, result], key=lambda r: (r["variant"], r["seed"]))
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=0))


def report_only(args) -> dict:
    """Tables and learning curves from the saved per-job results of the data sets asked for."""
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for data in args.data:
        path = args.results / f"{data}.json"
        if path.is_file():
            results += json.loads(path.read_text())["runs"]
    summary = tables(results, args)
    summary["learning_curves"] = curve_figures(results, args)
    for status in (pilot_status(args), cost_status(args, results)):
        if status:
            print("\n" + status)
            with open(args.out / "tables.md", "a") as f:
                f.write("\n" + status + "\n")
    return summary


def cost_status(args, results: list[dict]) -> str:
    """Core-hours per loss of --converge, as the jobs measured them (CPU time of their one
    thread): the seed-0 pilot (every chunk trained and every snapshot measured) and the other
    seeds (training and evaluation)."""
    lines, total = [], 0.0
    for data in args.data:
        labels = {v.key: v.label for v in DATASETS[data].variants + DATASETS[data].extras}
        for path in sorted((args.results / "pilots" / data).glob("*.json")):
            state = json.loads(path.read_text())
            pilot = (sum(c["train_cpu_s"] for c in state["chunks"]) +
                     sum(p["measure_cpu_s"] for p in state["points"])) / 3600
            seeds = [r for r in results if (r["data"], r["variant"]) == (data, path.stem)
                     and r["seed"] != 0]
            rest = sum(r["train_cpu_s"] + r["eval_cpu_s"] for r in seeds) / 3600
            total += pilot + rest
            lines.append(f"| {data} | {labels.get(path.stem, path.stem)} | "
                         f"{state['chunks'][-1]['step'] if state['chunks'] else 0:,} | {pilot:.2f} | "
                         f"{', '.join(str(r['seed']) for r in sorted(seeds, key=lambda r: r['seed'])) or '–'}"
                         f" | {rest:.2f} | {pilot + rest:.2f} |")
    head = ("| data | loss | pilot steps trained | pilot core-h (train + measure) | other seeds "
            "| their core-h | core-h |\n|---|---|---|---|---|---|---|")
    return (head + "\n" + "\n".join(lines) + f"\n| | all | | | | | **{total:.1f}** |") if lines else ""


def pilot_status(args) -> str:
    """Where each --converge pilot stands: steps trained, the verdict, its last measured point."""
    lines = []
    for data in args.data:
        labels = {v.key: v.label for v in DATASETS[data].variants + DATASETS[data].extras}
        key = QUALITY[data][0]
        for path in sorted((args.results / "pilots" / data).glob("*.json")):
            state = json.loads(path.read_text())
            if not state["points"]:
                continue
            last, trained = state["points"][-1], state["chunks"][-1]["step"] if state["chunks"] else 0
            verdict = state.get("verdict") or {}
            where = (f"converged at {verdict['step']:,}" if verdict.get("step") else
                     f"not converged at the cap ({trained:,})" if verdict else "training")
            lines.append(f"| {data} | {labels.get(path.stem, path.stem)} | {trained:,} | {where} | "
                         f"{last['step']:,} | {last['nll']['mean']:.3f} ± {last['nll']['stderr']:.3f} | "
                         f"{last['nelbo']['mean']:.3f} ± {last['nelbo']['stderr']:.3f} | "
                         f"{last[key]:.2f} ± {last[key + '_se']:.2f} |")
    head = ("| data | loss | steps trained | seed-0 pilot | last measured | NLL | NELBO | "
            f"{'FID' if 'digits' in args.data else 'quality'} |\n|---|---|---|---|---|---|---|---|")
    return head + "\n" + "\n".join(lines) if lines else ""


def _diagnose_one(ckpt: Path, out: Path, quick: bool) -> dict:
    from stcli.jobs.diagnose import DiagnoseOptions, diagnose, write

    torch.set_num_threads(1)
    opts = DiagnoseOptions(limit=16 if quick else 256, points=8 if quick else 40,
                           samples=32 if quick else 512, device="cpu")
    result = diagnose(ckpt, opts)
    write(result, out)
    return result


def diagnose_checkpoints(plan: Plan, args) -> dict:
    """`st diagnose` on seed 0 of each digits loss; Fig. 1a across losses, Figs. 6a/6b of g²."""
    import figures

    jobs = [j for j in plan.jobs if j.data.key == "digits" and j.seed == 0
            and j.variant.key in DIAG_LOSSES]
    if not jobs:
        return {}
    with _pool(args.jobs) as pool:
        futures = {j.variant.label: pool.submit(_diagnose_one, j.out_dir / "ckpt.safetensors",
                                                args.out / "diagnose" / j.variant.key, args.quick)
                   for j in jobs}
        diag = {label: f.result() for label, f in futures.items()}
    figures.fig1a_by_loss(diag, args.img / "repro_fig1a_integrand.png")
    shutil.copy(args.out / "diagnose" / "g2" / "diagnose.png", args.img / "repro_diagnose_g2.png")
    shutil.copy(args.out / "diagnose" / "st_P1" / "diagnose.png", args.img / "repro_diagnose_st_P1.png")
    return {label: {"t": d["integrand"]["t"], "dsm_bpd": [v / np.log(2) for v in d["integrand"]["dsm"]],
                    "seconds": d["seconds"]} for label, d in diag.items()}


def sample_figures(plan: Plan, args) -> None:
    """Samples of seed 0 of each loss: digit grids, mixture scatter plots."""
    import figures

    seed0 = {(j.data.key, j.variant.key): j for j in plan.jobs if j.seed == 0}
    for data in ("digits", "toy2d"):
        picked = {j.variant.label: _npz(j) for (d, _), j in seed0.items() if d == data}
        if not picked:
            continue
        if data == "digits":
            figures.sample_grids(picked, args.img / "repro_samples_digits.png")
        else:
            gmm = seed0[("toy2d", "g2")].recipe().data.gmm_params()
            figures.scatter_samples(picked, gmm, args.img / "repro_samples_toy2d.png")


def curve_figures(results: list[dict], args) -> dict:
    """NLL, NELBO and sample quality against the training step, seed 0 of each loss: the
    measured EMA snapshots and the final model, and the pilots of --converge still training."""
    import figures

    curves: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        if r["seed"] == 0 and r.get("curve") is not None and r["data"] in ("digits", "toy2d"):
            final = {k: r[k] for k in ("nll", "nelbo", QUALITY[r["data"]][0])}
            final[QUALITY[r["data"]][0] + "_se"] = r.get(QUALITY[r["data"]][0] + "_se", 0.0)
            points = [*r["curve"], final | {"step": r["recipe"]["train"]["steps"]}]
            curves.setdefault(r["data"], {})[r["label"]] = sorted(points, key=lambda p: p["step"])
    for data in args.data:
        labels = {v.key: v.label for v in DATASETS[data].variants + DATASETS[data].extras}
        for path in sorted((args.results / "pilots" / data).glob("*.json")):
            label = labels.get(path.stem)
            points = json.loads(path.read_text())["points"]
            if label and points and label not in curves.get(data, {}):
                curves.setdefault(data, {})[label + " (training)"] = points
    for data, by_loss in curves.items():
        key, label = QUALITY[data]
        figures.learning_curves(by_loss, key, label, args.img / f"repro_curves_{data}.png")
    return {data: {label: [{k: p[k] for k in ("step", "nll", "nelbo", key, key + "_se")}
                           for p in pts] for label, pts in by_loss.items()}
            for data, by_loss in curves.items() for key in [QUALITY[data][0]]}


def _npz(job: Job) -> np.ndarray:
    with np.load(job.out_dir / "samples" / "samples.npz", allow_pickle=False) as z:
        return z["arr_0"]


def tables(results: list[dict], args) -> dict:
    import figures

    rows, diffs = report.aggregate(results), report.paired(results)
    text = []
    for data, data_rows in rows.items():
        key, label = QUALITY[data]
        figures.tradeoff(data_rows, key, label, args.img / f"repro_tradeoff_{data}.png",
                         f"{data}: NLL vs sample quality (mean ± s.e. over seeds)")
        text += [f"### {data}", "", report.markdown(data_rows, data), "",
                 report.paired_markdown(diffs.get(data, []), data), ""]
    (args.out / "tables.md").write_text("\n".join(text))
    print("\n" + "\n".join(text))
    return {"tables": rows, "paired": diffs}


if __name__ == "__main__":
    main()
