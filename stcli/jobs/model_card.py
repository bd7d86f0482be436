"""The model card (``README.md``) of a diffusers export: what the net is and was trained on, how its
output becomes st's score, how to cite the method.  The Hub reads the YAML front matter.

``WRAPPER`` is the code docs/checkpoints.md shows ("Export to diffusers"); ``BIBTEX`` is the Soft
Truncation reference of CITATION.cff (tests/test_export_diffusers.py checks both).
"""

from __future__ import annotations

from stcli.components.recipe import Recipe

BIBTEX = """@inproceedings{kim2022soft,
  title     = {Soft Truncation: A Universal Training Technique of Score-based Diffusion Model
               for High Precision Score Estimation},
  author    = {Kim, Dongjun and Shin, Seungjae and Song, Kyungwoo and Kang, Wanmo and Moon, Il-Chul},
  booktitle = {Proceedings of the 39th International Conference on Machine Learning (ICML)},
  year      = {2022}
}"""

WRAPPER = '''import json
from pathlib import Path

import torch
from diffusers import UNet2DModel

from stcli.infra.registry import SDES


def st_score(folder):
    """st's score s(x, t) of the net exported to `folder`: x (B, C, H, W) in the data's range
    ([0, 1] or [-1, 1], as trained), t a float or a (B,) tensor in [eps, 1]."""
    unet = UNet2DModel.from_pretrained(folder).eval()
    info = json.loads((Path(folder) / "st_score.json").read_text())
    sde = SDES.build(**info["sde"])
    fourier = unet.config.time_embedding_type == "fourier"
    sign = 1.0 if info["output"] == "sigma_score" else -1.0  # the net outputs sigma s or -sigma s

    @torch.no_grad()
    def score(x, t):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        eta = sde.time_input(t, info["time_input"])  # st's time input, in float64
        timestep = eta.exp() if fourier else eta     # the Fourier embedding takes log(timestep)
        out = unet(x, timestep).sample.double()      # (2x - 1 of [0, 1] data happens inside)
        if fourier:
            out = out * timestep.view(-1, 1, 1, 1)   # UNet2DModel divides a Fourier net's output by it
        return (sign * out / sde.std(t).view(-1, 1, 1, 1)).to(x.dtype)

    return score
'''


def model_card(recipe: Recipe, step: int, weights: str, scheduler: str | None, info: dict) -> str:
    """The README.md of an export of ``recipe``'s net after ``step`` steps (``weights``: ema or
    raw); ``scheduler`` is the diffusers scheduler class written, if any; ``info`` st_score.json."""
    return "\n".join([
        "---", "library_name: diffusers", "pipeline_tag: unconditional-image-generation",
        "tags: [score-based-generative-modeling, soft-truncation]", "---", "",
        f"# {recipe.name}", "",
        "A score network trained by st (score-based diffusion with Soft Truncation), exported as a "
        "diffusers `UNet2DModel`.", "",
        "| | |", "|---|---|", *_rows(recipe, step, weights, scheduler), "",
        "## The score", "",
        "`st_score(folder)` returns st's score s(x, t) (it needs st, installed from its source "
        "(`pip install -e .` in its checkout: PyPI's `stcli` is another project), and `diffusers`; for "
        "a copy on the Hub, `folder = huggingface_hub.snapshot_download(REPO)`):", "",
        "```python", WRAPPER.rstrip("\n"), "```", "", *_native(info),
        "## Citation", "", "```bibtex", BIBTEX, "```", ""])


def _rows(recipe: Recipe, step: int, weights: str, scheduler: str | None) -> list[str]:
    data, sde, net = recipe.data, recipe.sde, recipe.net
    channels, height, width = data.shape
    params = ", ".join(f"{k} {v}" for k, v in sde.model_dump().items() if k not in ("name", "eps"))
    attn = (f"attention at {', '.join(map(str, net.attn_resolutions))}" if net.attn_resolutions
            else "no attention")
    sched = (f"`scheduler_config.json`: diffusers' {scheduler} (the same sigma(t))" if scheduler else
             f"none: no diffusers scheduler computes the {sde.name} SDE; `st_score.json` holds st's "
             "description of it")
    sample = recipe.sample
    times, schedule = getattr(sample, "times", None), getattr(sample, "schedule", "uniform")
    grid = (f"{len(times)} explicit times" if times is not None else f"the {schedule} grid")
    if scheduler and (times is not None or schedule != "uniform"
                      or sample.name not in ("pc", "euler_maruyama")):
        # diffusers' score-SDE schedulers step the reverse SDE uniformly in t
        sched += (f"; the recipe samples with {sample.name} on {grid} (`st_score.json`, "
                  "`sample`), which this scheduler, stepping the reverse SDE uniformly in t, "
                  "does not reproduce")
    return [
        f"| recipe | `{recipe.name}` |",
        f"| data | {data.name}, {channels}x{height}x{width}, "
        f"{'[-1, 1]' if data.zero_centered else '[0, 1] (the net sees 2x - 1)'} |",
        f"| SDE | {sde.name} ({params}), eps {sde.eps:g} |",
        f"| network | {net.name}: nf {net.nf}, ch_mult {net.ch_mult}, {net.num_res_blocks} residual "
        f"blocks per level, {attn}, time input {net.time_input} "
        f"({net.embedding_type} embedding) |",
        f"| training | {step} steps; {weights} weights |",
        f"| scheduler | {sched} |",
        "| metrics | none: the checkpoint holds no evaluation records (`st nll` and `st fid` write "
        "theirs to `--json` files) |"]


def _native(info: dict) -> list[str]:
    if not info["native_score"]:
        return []
    return ["The net also follows diffusers' own convention for score models: "
            "`unet(x, sigma).sample` is the score at noise level sigma (a log-sigma Fourier "
            "time input, output divided by sigma).", ""]
