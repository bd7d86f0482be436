"""Rebuild a trained score model from a checkpoint alone (its recipe travels inside it).

`open_checkpoint` is the one validation path of every reader of a checkpoint (`st train
--resume`, `st sample`, `st nll`, `st diagnose`, `st fid`): a damaged or foreign file is one
UserError naming what is wrong, never a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from stcli.components.nets import ScoreModel, build_score_model
from stcli.components.recipe import Recipe, parse_recipe
from stcli.infra import checkpoint
from stcli.infra.errors import UserError


@dataclass
class Opened:
    tensors: dict[str, torch.Tensor]
    meta: dict
    recipe: Recipe
    step: int


def open_checkpoint(path: str | Path) -> Opened:
    """Tensors, metadata, recipe and step of checkpoint `path`, each checked."""
    tensors, meta = checkpoint.load(path)
    if "recipe" not in meta:
        raise UserError(f"checkpoint {path} holds no recipe")
    if not isinstance(meta["recipe"], dict):
        raise UserError(f"checkpoint {path} is damaged: its recipe is not a mapping")
    recipe = parse_recipe(meta["recipe"], f"the recipe inside {path}")
    step = meta.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint {path} is damaged: its step {step!r} is not a "
                        "non-negative integer")
    check_values(tensors, "export" in meta, path)
    return Opened(tensors, meta, recipe, step)


WEIGHTS = ("model.", "ema.", "optim.")  # the sections of weights and optimizer moments


def check_values(tensors: dict[str, torch.Tensor], export: bool, path) -> None:
    """Weights and optimizer moments are floating point -- float32, which st trains in, unless
    the file is an `st export` (fp16/bf16 parameters) -- and finite; RNG states are bytes.  A
    file that breaks this was damaged after st wrote it: refuse it rather than compute with it."""
    for name, t in tensors.items():
        if name.startswith("rng."):
            if t.dtype != torch.uint8:
                raise UserError(f"checkpoint {path} is damaged: its RNG state {name} holds "
                                f"{_dtype(t)} values, not bytes")
            continue
        if not name.startswith(WEIGHTS):
            continue
        if not t.is_floating_point() or (not export and t.dtype != torch.float32):
            raise UserError(f"checkpoint {path} is damaged: {name} holds {_dtype(t)} values "
                            f"where st writes {'floating-point' if export else 'float32'} ones")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"checkpoint {path} is damaged: {name} holds {bad} non-finite "
                            "value(s) (NaN or Inf); st never writes such weights")


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], path, what: str,
                 assign: bool = True) -> None:
    """Load `state` into `model`, or a UserError naming the mismatch (`assign`: take the
    tensors themselves, for a model built on the meta device)."""
    try:
        model.load_state_dict(state, assign=assign)
    except RuntimeError as err:
        first = str(err).splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0])
        raise UserError(f"checkpoint {path} does not match its recipe's net: {what} {detail}"
                        ) from None


@dataclass
class Loaded:
    recipe: Recipe
    model: ScoreModel  # in eval mode, on the requested device
    step: int
    weights: str = "ema"  # the weights taken: "ema" or "raw"


def load_model(path: str | Path, weights: Literal["ema", "raw"] = "ema",
               device: str | torch.device = "cpu") -> Loaded:
    """The model of checkpoint `path` with its EMA (default) or raw weights.

    An `st export` keeps one set: it is taken where the default (ema) was asked, and
    `Loaded.weights` says which; asking for raw weights of an EMA export is refused, as the
    numbers would be labelled with weights they did not come from."""
    opened = open_checkpoint(path)
    recipe, tensors = opened.recipe, opened.tensors
    exported = opened.meta.get("export", {}).get("weights")
    if exported is not None and exported != weights:
        if weights != "ema":
            raise UserError(f"{path} is an export holding only its {exported} weights; "
                            f"drop --weights {weights} (or export the {weights} weights from the "
                            "training checkpoint)")
        weights = exported
    state = checkpoint.section("ema" if weights == "ema" else "model", tensors)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # fp16 exports
    if not state:
        raise UserError(f"checkpoint {path} holds no {weights} weights"
                        + ("; use --weights raw" if weights == "ema" else ""))
    model = model_from_state(recipe, state, path, weights)
    return Loaded(recipe, model.to(device).eval().requires_grad_(False), opened.step, weights)


def model_from_state(recipe: Recipe, state: dict[str, torch.Tensor], path, weights: str) -> ScoreModel:
    """The recipe's net built on the meta device and given `state` (its tensors themselves), or a
    UserError naming the first tensor that does not fit or is missing."""
    with torch.device("meta"):
        model = build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                                  recipe.data.zero_centered)
    load_weights(model, state, path, f"{weights} weights of {recipe.net.name}:")
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise UserError(f"checkpoint {path} lacks some tensors of its net ({recipe.net.name})")
    return model
