"""Rebuild a trained score model from a checkpoint alone (its recipe travels inside it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from stcli import checkpoint
from stcli.errors import UserError
from stcli.nets import ScoreModel, build_score_model
from stcli.recipe import Recipe, parse_recipe


@dataclass
class Loaded:
    recipe: Recipe
    model: ScoreModel  # in eval mode, on the requested device
    step: int


def load_model(path: str | Path, weights: Literal["ema", "raw"] = "ema",
               device: str | torch.device = "cpu") -> Loaded:
    """The model of checkpoint `path` with its EMA (default) or raw weights."""
    tensors, meta = checkpoint.load(path)
    if "recipe" not in meta:
        raise UserError(f"checkpoint {path} holds no recipe")
    recipe = parse_recipe(meta["recipe"], f"the recipe inside {path}")
    exported = meta.get("export", {}).get("weights")
    if exported is not None:  # `st export` keeps one set of weights: use it, whatever was asked
        weights = exported
    state = checkpoint.section("ema" if weights == "ema" else "model", tensors)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 exports
    if not state:
        raise UserError(f"checkpoint {path} holds no {weights} weights"
                        + ("; use --weights raw" if weights == "ema" else ""))
    with torch.device("meta"):
        model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                                  getattr(recipe.data, "centered", True))
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise UserError(f"checkpoint {path} does not match its recipe's net "
                        f"({recipe.net.name}): {str(err).splitlines()[0]}") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UserError(f"checkpoint {path} lacks some tensors of its net ({recipe.net.name})")
    return Loaded(recipe, model.to(device).eval().requires_grad_(False), int(meta.get("step", 0)))
