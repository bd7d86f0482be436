"""The cost table of docs/cost.md: every paper recipe (and the quickstart), on one device.

    python benchmarks/cost_table.py [--write docs/cost.md] [--gpus H100 A100]

Prints a Markdown table of `stcli.jobs.cost.count` for each recipe: parameters, GFLOP of one
network evaluation (batch 1) and of one training step at the recipe's batch, memory of that
step, the sampler's NFE, and per GPU the time of a step, of the run (train.steps) and of a
50,000-sample FID.  With --write, replaces the table between the page's two COST TABLE markers.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from stcli.components.recipe import load_recipe
from stcli.jobs import cost

ROOT = Path(__file__).resolve().parents[1]
PAPER = ("cifar10_", "celeba_", "celebahq_", "imagenet32_", "stl10_")
MARKERS = ("<!-- COST TABLE START -->", "<!-- COST TABLE END -->")


def recipes() -> list[Path]:
    """The paper recipes, grouped by data set, then the quickstart."""
    paths = [p for prefix in PAPER for p in sorted((ROOT / "recipes").glob(f"{prefix}*.yaml"))]
    return paths + [ROOT / "recipes" / "quickstart_digits.yaml"]


def row(path: Path, gpus: list[cost.Gpu]) -> list[str]:
    c = cost.count(load_recipe(path))
    cells = [f"`{path.stem}`", f"{c.parameters / 1e6:.2f}M", f"{c.eval_flops_1 / 1e9:,.1f}",
             f"{c.step_flops / 1e9:,.0f}", str(c.micro_batches * c.batch),
             f"{c.memory.total / 2**30:,.1f}", f"{c.steps:,}", "adaptive" if c.nfe is None else f"{c.nfe:,}"]
    for gpu in gpus:
        t = cost.timing(c, gpu)
        fid = "-" if t.fid_s is None else cost.duration(t.fid_s)
        cells += [f"{t.step_s * 1e3:,.1f} ms", cost.duration(t.run_s), fid, "yes" if t.fits else "**no**"]
    return cells


def table(gpus: list[cost.Gpu]) -> str:
    head = ["recipe", "params", "GFLOP / eval", "GFLOP / step", "batch", "GiB", "steps", "NFE"]
    for gpu in gpus:
        head += [f"{gpu.name} step", f"{gpu.name} run", f"{gpu.name} FID", f"{gpu.name} fits"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in recipes():
        lines.append("| " + " | ".join(row(path, gpus)) + " |")
    return "\n".join(lines)


def write(page: Path, text: str) -> None:
    """Replace what lies between the MARKERS of `page` with `text`."""
    start, end = map(re.escape, MARKERS)
    old = page.read_text()
    new, n = re.subn(f"{start}.*?{end}", lambda _: f"{MARKERS[0]}\n{text}\n{MARKERS[1]}", old,
                     flags=re.S)
    if n != 1:
        raise SystemExit(f"{page} has no {MARKERS[0]} ... {MARKERS[1]} block")
    page.write_text(new)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", nargs="+", default=["H100", "A100"])
    parser.add_argument("--write", type=Path, help="page whose COST TABLE block to replace")
    args = parser.parse_args()
    text = table([cost.gpu(name) for name in args.gpus])
    if args.write:
        write(args.write, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
