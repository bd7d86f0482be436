"""Draw what TensorBoard shows of a run — its scalars and the last sample grid — from the event
files, headless (no browser, no TensorBoard server).

    python benchmarks/tensorboard_render.py RUN_FOLDER [--out docs/img/tensorboard_quickstart.png]

The event files in RUN_FOLDER/tensorboard are read with TensorBoard's own `event_accumulator`
(which applies the purges of resumed runs, as TensorBoard does); each scalar card is drawn as
a panel (raw values, TensorBoard's default 0.6 exponential smoothing as the darker line), the
loss per diffusion-time bin in one panel and also as loss against t at a few steps (the
paper's Fig. 6(a) view), and the last image of the `samples` tag as it is stored.
"""

from __future__ import annotations

import argparse
import io
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from stcli.infra.console import info  # noqa: E402

CARDS = ["loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "peak_mem_mb", "wall_s",
         "heldout_loss"]
TAUS = ["tau_min", "tau_q10", "tau_q50", "tau_q90", "tau_max"]


def edges(tag: str) -> tuple[float, float]:
    """(lo, hi) of a `loss_t/<lo>-<hi>` tag."""
    lo, hi = re.fullmatch(r"loss_t/(.+e[+-]\d+)-(.+e[+-]\d+)", tag).groups()
    return float(lo), float(hi)


def smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """TensorBoard's debiased exponential moving average."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight**n))
    return out


def card(ax, acc, tag: str, label: str | None = None) -> None:
    events = acc.Scalars(tag)
    steps, values = [e.step for e in events], [e.value for e in events]
    line, = ax.plot(steps, values, alpha=0.3)
    ax.plot(steps, smooth(values), color=line.get_color(), label=label)


def overlay(ax, acc, tags, prefix: int, title: str, legend_size: int) -> None:
    """Several scalars on one log-scale card, each labelled by its tag less `prefix` characters."""
    for tag in tags:
        card(ax, acc, tag, tag[prefix:])
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=legend_size)


def render(run: Path, out: Path) -> None:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = set(tags["scalars"])
    cards = [t for t in CARDS if t in scalars]
    bins = sorted((t for t in scalars if t.startswith("loss_t/")), key=edges)
    fig = plt.figure(figsize=(20, 10))
    grid = fig.add_gridspec(3, 6)
    for i, tag in enumerate(cards):
        ax = fig.add_subplot(grid[i // 4, i % 4])
        card(ax, acc, tag)
        ax.set_title(tag, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        if tag == "loss":
            ax.set_yscale("log")
    overlay(fig.add_subplot(grid[2, 0]), acc, TAUS, len("tau_"), "tau over each window", 7)
    overlay(fig.add_subplot(grid[2, 1]), acc, bins, len("loss_t/"), "loss_t/* (mean loss per t bin)", 6)
    ax = fig.add_subplot(grid[2, 2])
    for k in np.linspace(0, len(acc.Scalars(bins[0])) - 1, 4).round().astype(int):
        points = []
        for tag in bins:
            lo, hi = edges(tag)
            events = {e.step: e.value for e in acc.Scalars(tag)}
            step = acc.Scalars(bins[0])[k].step
            if step in events:
                points.append((np.sqrt(lo * hi), events[step]))
        if points:
            ax.plot(*zip(*points), marker="o", label=f"step {step}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("diffusion time t (bin centre)", fontsize=8)
    ax.set_title("loss against t (Fig. 6a view)", fontsize=10)
    ax.legend(fontsize=7)
    if "samples" in tags["images"]:
        last = acc.Images("samples")[-1]
        ax = fig.add_subplot(grid[:, 4:])
        ax.imshow(Image.open(io.BytesIO(last.encoded_image_string)), interpolation="nearest")
        ax.set_title(f"IMAGES: samples, step {last.step}", fontsize=10)
        ax.axis("off")
    name = yaml.safe_load((run / "recipe.yaml").read_text())["name"]
    fig.suptitle(f"TensorBoard event files of a {name} run, read with event_accumulator "
                 "(a rendering, not the TensorBoard UI)", fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    info(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("docs/img/tensorboard_quickstart.png"))
    args = parser.parse_args()
    render(args.run, args.out)


if __name__ == "__main__":
    main()
