"""`st import`: score_sde / Soft Truncation checkpoints (``checkpoint_*.pth``) as st checkpoints.

The released files hold a dict ``{model, ema, optimizer, step}``: ``model`` is the state dict of
the NCSN++ / DDPM++ net wrapped in ``DataParallel`` (keys ``module.all_modules.N.<param>``, one
flat list of modules in construction order) and ``ema.shadow_params`` the EMA copies of the
parameters that require grad, in ``model.parameters()`` order.  They are read with
``torch.load(weights_only=True)``: nothing in the file can run code.

The name mapping is data: ``official_modules`` walks the official construction order for the
recipe's net options (Song et al. 2021, NCSN++ / DDPM++, App. H of that paper) and pairs every
official module index with the st module that computes the same thing; ``mapping`` expands it to
one row per st tensor.  The net options themselves make st compute the official function
(``scale_by_sigma``, the 2x - 1 input map of uncentred data), so the import only renames and
re-lays out tensors.
"""

from __future__ import annotations

import math
import pickle
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stcli.components.nets import build_score_model
from stcli.components.nets.ncsnpp import NCSNppSpec
from stcli.components.recipe import Recipe, parse_recipe
from stcli.infra import checkpoint
from stcli.infra.errors import UserError

PREFIX = "module."  # torch.nn.DataParallel
BUFFERS = ("sigmas",)  # the official net's noise table: not part of the function of t


@dataclass(frozen=True)
class Row:
    """One st tensor and the official tensor(s) it is made from.

    kind: ``copy``; ``nin`` (score_sde's NIN weight W (in, out) as a 1x1 conv weight (out, in,
    1, 1)); ``qkv`` (three NIN weights or biases stacked into st's fused q, k, v projection);
    ``conv_t`` (an up-sampling conv weight (out, in, 3, 3) as the transposed-conv weight (in, out,
    3, 3) that applies it, flipped in space).
    """

    st: str
    official: tuple[str, ...]
    kind: str = "copy"

    def expected(self, st_shape: torch.Size) -> tuple[int, ...]:
        """The shape each official tensor must have for an st tensor of ``st_shape``."""
        s = tuple(st_shape)
        if self.kind == "nin" and len(s) == 4:
            return (s[1], s[0])
        if self.kind == "qkv":
            return (s[1], s[0] // 3) if len(s) == 4 else (s[0] // 3,)
        if self.kind == "conv_t":
            return (s[1], s[0], *s[2:])
        return s

    def convert(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The st tensor from the official ones (shapes already checked)."""
        if self.kind == "copy":
            return tensors[0]
        if self.kind == "nin":
            w = tensors[0]
            return w.t()[:, :, None, None] if w.dim() == 2 else w
        if self.kind == "qkv":
            return torch.cat([w.t()[:, :, None, None] if w.dim() == 2 else w for w in tensors])
        if self.kind == "conv_t":
            return tensors[0].flip(2, 3).transpose(0, 1)
        raise ValueError(f"unknown row kind {self.kind!r}")

    def invert(self, st_tensor: torch.Tensor) -> list[torch.Tensor]:
        """The official tensors of an st tensor (for tests and `export`-style round trips)."""
        if self.kind == "copy":
            return [st_tensor]
        if self.kind == "nin":
            return [st_tensor[:, :, 0, 0].t() if st_tensor.dim() == 4 else st_tensor]
        if self.kind == "qkv":
            return [w[:, :, 0, 0].t() if w.dim() == 4 else w for w in st_tensor.chunk(3)]
        return [st_tensor.transpose(0, 1).flip(2, 3)]


# --- the official module order ------------------------------------------------------------------
# Parameters of each kind of official module: official sub-name -> (st sub-name, row kind).
_AFFINE = {"weight": ("weight", "copy"), "bias": ("bias", "copy")}
_RESBLOCK = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "temb_proj",
             "GroupNorm_1": "norm2", "Conv_1": "conv2"}


def official_modules(spec: NCSNppSpec, channels: int, size: int) -> Iterator[tuple[str, str]]:
    """(kind, st module path) of every official module, in score_sde's construction order.

    The index of a pair in this sequence is its ``all_modules`` index.  Kinds: fourier, linear,
    conv, norm, resblock, attn, combine, resample (a layerspp Up/Downsample).  The resamplers of
    the input and output pyramids (``input_skip`` / ``output_skip``) have no parameters and are
    plain attributes of the official net, not entries of ``all_modules``.
    """
    last = len(spec.ch_mult) - 1
    attn = [r in spec.attn_resolutions for r in spec.resolutions(size)]
    biggan = spec.resblock_type == "biggan"
    if spec.embedding_type == "fourier":
        yield "fourier", "embed.fourier"
    if spec.conditional:
        yield "linear", "embed.mlp.0"
        yield "linear", "embed.mlp.2"
    yield "conv", "conv_in"
    for i in range(len(spec.ch_mult)):
        for b in range(spec.num_res_blocks):
            yield "resblock", f"down.{i}.blocks.{b}"
            if attn[i]:
                yield "attn", f"down.{i}.attns.{b}"
        if i != last:
            yield ("resblock" if biggan else "resample"), f"down.{i}.resample"
            if spec.progressive_input == "input_skip":  # its resampler is no entry: no parameters
                yield "combine", f"down.{i}.pyramid"
            elif spec.progressive_input == "residual":
                yield "resample", f"down.{i}.pyramid"
    yield "resblock", "mid.0"
    yield "attn", "mid.1"
    yield "resblock", "mid.2"
    for k, i in enumerate(reversed(range(len(spec.ch_mult)))):
        for b in range(spec.num_res_blocks + 1):
            yield "resblock", f"up.{k}.blocks.{b}"
        if attn[i]:
            yield "attn", f"up.{k}.attns.0"
        if spec.progressive == "output_skip" or (spec.progressive == "residual" and i == last):
            yield "norm", f"up.{k}.pyramid.norm"
            yield "conv", f"up.{k}.pyramid.conv"
        elif spec.progressive == "residual":
            yield "resample", f"up.{k}.pyramid"
        if i != 0:
            yield ("resblock" if biggan else "resample"), f"up.{k}.resample"
    if spec.progressive != "output_skip":
        yield "norm", "head.norm"
        yield "conv", "head.conv"


def _params(kind: str, module: torch.nn.Module, spec: NCSNppSpec) -> Iterator[tuple[str, str, str]]:
    """(official sub-name, st sub-name, row kind) of the parameters of one official module."""
    if kind == "fourier":
        yield "W", "W", "copy"
    elif kind in ("linear", "conv", "norm", "combine"):
        prefix = "Conv_0." if kind == "combine" else ""  # layerspp.Combine's 1x1 conv
        for name, (st_name, row) in _AFFINE.items():
            yield prefix + name, st_name, row
    elif kind == "resblock":
        for official, st_name in _RESBLOCK.items():
            if getattr(module, st_name, None) is not None:
                yield from ((f"{official}.{p}", f"{st_name}.{p}", "copy") for p in ("weight", "bias"))
        if module.skip is not None:  # BigGAN blocks: a 1x1 conv; DDPM blocks: a NIN
            if spec.resblock_type == "biggan":
                yield from ((f"Conv_2.{p}", f"skip.{p}", "copy") for p in ("weight", "bias"))
            else:
                yield "NIN_0.W", "skip.weight", "nin"
                yield "NIN_0.b", "skip.bias", "copy"
    elif kind == "attn":
        yield "GroupNorm_0.weight", "norm.weight", "copy"
        yield "GroupNorm_0.bias", "norm.bias", "copy"
        yield "NIN_0.W NIN_1.W NIN_2.W", "qkv.weight", "qkv"
        yield "NIN_0.b NIN_1.b NIN_2.b", "qkv.bias", "qkv"
        yield "NIN_3.W", "proj.weight", "nin"
        yield "NIN_3.b", "proj.bias", "copy"
    elif kind == "resample":
        yield from _resample_params(module)


def _resample_params(module: torch.nn.Module) -> Iterator[tuple[str, str, str]]:
    """layerspp Upsample / Downsample: FIR convs are ``Conv2d_0``, plain convs ``Conv_0``."""
    from stcli.components.nets.fir import FIRDownConv, FIRUpConv

    if isinstance(module, FIRDownConv | FIRUpConv):
        up = isinstance(module, FIRUpConv)  # weight in the transposed layout, bias outside
        yield "Conv2d_0.weight", "conv.weight", "conv_t" if up else "copy"
        yield "Conv2d_0.bias", "bias" if up else "conv.bias", "copy"
    elif isinstance(module, torch.nn.Sequential):  # (pad or upsample, conv)
        yield "Conv_0.weight", "1.weight", "copy"
        yield "Conv_0.bias", "1.bias", "copy"


def mapping(recipe: Recipe) -> list[Row]:
    """One row per tensor of the recipe's st model, in the official module order."""
    return plan(recipe)[0]


def plan(recipe: Recipe) -> tuple[list[Row], dict[str, torch.Size]]:
    """The rows of ``mapping`` and the shape of every st tensor (one meta-device build)."""
    spec = recipe.net
    if not isinstance(spec, NCSNppSpec):
        raise UserError(f"st import reads score_sde NCSN++ / DDPM++ checkpoints; the recipe's net "
                        f"is {spec.name!r} (use ncsnpp or ddpmpp)")
    if spec.preconditioning != "none":
        raise UserError("st import needs net.preconditioning: none (score_sde nets are not "
                        "EDM-preconditioned)")
    with torch.device("meta"):
        model = _build(recipe)
    backbone, rows = model.backbone, []
    for index, (kind, path) in enumerate(official_modules(spec, *recipe.data.shape[:2])):
        module = backbone.get_submodule(path)
        for official, st_name, row_kind in _params(kind, module, spec):
            names = tuple(f"all_modules.{index}.{o}" for o in official.split())
            rows.append(Row(f"backbone.{path}.{st_name}", names, row_kind))
    return rows, {k: v.shape for k, v in model.state_dict().items()}


def _build(recipe: Recipe):
    return build_score_model(recipe.net, recipe.sde, recipe.data.shape,
                             recipe.data.zero_centered)


# --- what each release computes ----------------------------------------------------------------
KEEP = object()  # in Release.sets: the recipe's own value of that field
RELEASE_EPS = 1e-5  # the eps the release's RVE and UDDPM++ functions are built with


@dataclass(frozen=True)
class Release:
    """Where the released code computes something other than the paper's recipe: for a recipe
    matching ``when`` (dotted field -> allowed values), the released run has ``sets`` (dotted
    field -> value; a dict replaces the whole section).  docs/fidelity.md gives the evidence."""

    what: str
    when: dict
    sets: dict
    why: str


RELEASES = (
    Release("UNCSN++ time input", {"net.name": ("ncsnpp",), "net.time_input": ("unbounded",)},
            {"net.time_input": "log_sigma"},
            "the release computes the unbounded eta but its network receives log sigma at every sigma"),
    Release("CelebA-HQ 256 SDE and loss", {"sde.name": ("rve",), "data.image_size": (256,)},
            {"sde": {"name": "ve", "sigma_min": 0.01, "sigma_max": 348.0},
             "loss.weighting": "variance", "loss.time_sampling": "uniform"},
            "the released 256x256 config is a VE SDE, sigma 0.01 -> 348, with variance weighting"),
    Release("VE/RVE truncation", {"sde.name": ("ve", "rve"), "truncation.name": ("power", "mixture")},
            {"truncation": {"name": "hard", "eps": KEEP}},
            "the release never soft-truncates a VE/RVE run (tau = eps at every step)"),
    # st's sde.eps is truncation.eps; these functions of the release are built at 1e-5 whatever
    # its truncation_time (config.training.truncation_time) says
    Release("RVE eps", {"sde.name": ("rve",)}, {"truncation.eps": RELEASE_EPS},
            "the release builds the reciprocal VE's sigma(t) with eps = 1e-5 (reciprocal_VESDE)"),
    Release("UDDPM++ eps", {"net.time_input": ("int_g2_sigma2",)}, {"truncation.eps": RELEASE_EPS},
            "the release scales the UDDPM++ time input on [1e-5, T] (get_score_fn)"),
)


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _set(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        data = data[part]
    data[leaf] = value


def _show(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return str(value)


@dataclass
class Released:
    """The recipe of the released function and one line per setting that differs."""

    recipe: Recipe
    changes: list[str] = field(default_factory=list)


def released_recipe(recipe: Recipe) -> Released:
    """``recipe`` with every setting of RELEASES applied (in order, each to the result so far)."""
    data, changes = recipe.to_dict(), []
    for rule in RELEASES:
        if not all(_get(data, k) in allowed for k, allowed in rule.when.items()):
            continue
        for key, value in rule.sets.items():
            old = _get(data, key)
            if isinstance(value, dict):
                value = {k: (old or {}).get(k) if v is KEEP else v for k, v in value.items()}
                if all(old.get(k) == v for k, v in value.items()) and set(old) <= set(value):
                    continue
            elif old == value:
                continue
            _set(data, key, value)
            changes.append(f"{key}: {_show(value)} (the recipe said {_show(old)}): {rule.why}")
    return Released(parse_recipe(data, "the released recipe") if changes else recipe, changes)


def check_noise_table(official: Official, recipe: Recipe, source: str) -> str | None:
    """The file's noise table (``sigmas``, geometric from sigma_max to sigma_min) against the
    recipe's VE/RVE sigma range: None if they agree (or the SDE is not VE-type), else the
    problem, naming the setting."""
    table, sde = official.model.get("sigmas"), recipe.sde
    if table is None or table.numel() < 2 or sde.name not in ("ve", "rve"):
        return None
    hi, lo = float(table.max()), float(table.min())
    if math.isclose(hi, sde.sigma_max, rel_tol=1e-6) and math.isclose(lo, sde.sigma_min, rel_tol=1e-6):
        return None
    return (f"{source} holds the noise table sigma {lo:g} -> {hi:g} (module.sigmas, built from "
            f"its config's sigma range), but the recipe's sde has sigma_min {sde.sigma_min:g}, "
            f"sigma_max {sde.sigma_max:g}; set sde.sigma_min={lo:g} sde.sigma_max={hi:g} if the "
            "file is a VE/RVE run (every file holds this table, a VP one too: it does not say "
            "which SDE trained it)")


# --- reading the official file ------------------------------------------------------------------
@dataclass
class Official:
    model: dict[str, torch.Tensor]  # without the DataParallel prefix, in the file's order
    shadow: list[torch.Tensor]
    step: int


def read(path: str | Path) -> Official:
    """The score_sde checkpoint at ``path``, loaded without running any pickled code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if code:
            raise UserError(f"{path} cannot be loaded without running pickled code ({code[1]}), "
                            f"which st refuses; score_sde checkpoints hold tensors only") from None
        raise UserError(f"{path} is not a readable PyTorch checkpoint") from None
    except Exception as err:  # a foreign file can fail the decoder anywhere
        # (a text file: KeyError from the legacy-format reader; truncation: EOFError, ...)
        text = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        reason = text if isinstance(err, (RuntimeError, OSError, ValueError)) and text else \
            f"{type(err).__name__}{': ' + text if text else ''}"
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({reason})") from None
    what = "a score_sde checkpoint (a dict with 'model', 'ema' and 'step')"
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not {what}")
    ema = state.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow_params"), list | tuple):
        raise UserError(f"{path} is not {what}: its 'ema' has no shadow_params list")
    model = {}
    for key, value in state["model"].items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise UserError(f"{path} is not {what}: 'model' holds a non-tensor entry {key!r}")
        model[key.removeprefix(PREFIX)] = value
    shadow = list(ema["shadow_params"])
    if not all(isinstance(t, torch.Tensor) for t in shadow):
        raise UserError(f"{path} is not {what}: ema.shadow_params holds non-tensors")
    return Official(model, shadow, _step(state.get("step", 0), path, what))


def _step(step, path: Path, what: str) -> int:
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"{path} is not {what}: its step is {step!r}, not a count of steps >= 0")
    return step


def _check_values(name: str, tensor: torch.Tensor, source: str) -> None:
    """A weight must be floating point and finite: anything else would be a different function."""
    if not tensor.is_floating_point():
        raise UserError(f"{source}: {PREFIX}{name} holds {str(tensor.dtype).removeprefix('torch.')} "
                        f"values, not floating-point weights")
    if not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise UserError(f"{source}: {PREFIX}{name} holds {bad} non-finite value(s) (NaN or Inf); "
                        f"the checkpoint is damaged")


def convert(official: Official, recipe: Recipe, source: str = "the checkpoint"
            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(raw, ema) st state dicts of the official weights; UserError on the first mismatch."""
    rows, expected = plan(recipe)
    fixed = {name for row in rows if row.st.endswith("fourier.W") for name in row.official}
    raw_names = _check_names(rows, official.model, source)
    for row in rows:
        want = row.expected(expected[row.st])
        for name in row.official:
            got = tuple(official.model[name].shape)
            if got != want:
                st_shape = list(expected[row.st])
                laid_out = "" if list(want) == st_shape else f" (st shape {st_shape})"
                raise UserError(f"{source} does not fit the recipe: {PREFIX}{name} has shape "
                                f"{list(got)}, but st's {row.st} needs {list(want)}{laid_out}; "
                                f"check the recipe's net and data options")
    trainable = [n for n in raw_names if n not in fixed]
    if len(official.shadow) != len(trainable):
        raise UserError(f"{source}: ema.shadow_params holds {len(official.shadow)} tensors, but "
                        f"the net has {len(trainable)} trainable parameters")
    shadow = dict(zip(trainable, official.shadow))
    for name in trainable:
        if tuple(shadow[name].shape) != tuple(official.model[name].shape):
            raise UserError(f"{source}: the EMA copy of {PREFIX}{name} has shape "
                            f"{list(shadow[name].shape)}, the weight {list(official.model[name].shape)}")
    for name in raw_names:
        _check_values(name, official.model[name], source)
        if name in shadow:
            _check_values(name, shadow[name], f"{source} (its EMA copy)")
    ema_source = {**official.model, **shadow}
    raw = {row.st: _to_st(row, official.model, expected) for row in rows}
    ema = {row.st: _to_st(row, ema_source, expected) for row in rows}
    return raw, ema


def _to_st(row: Row, tensors: dict[str, torch.Tensor], expected) -> torch.Tensor:
    out = row.convert([tensors[n].float() for n in row.official])
    return out.reshape(expected[row.st]).contiguous().clone()


def _check_names(rows: list[Row], model: dict[str, torch.Tensor], source: str) -> list[str]:
    """The official parameter names in the file's order; UserError on a missing or extra one."""
    wanted = [name for row in rows for name in row.official]
    present = set(model)
    for row in rows:
        for name in row.official:
            if name not in present:
                module = ".".join(name.split(".")[:2])  # all_modules.N
                held = [n.removeprefix(module + ".") for n in model if n.startswith(module + ".")]
                more = ", ..." if len(held) > 4 else ""
                there = f"its {PREFIX}{module} holds {', '.join(held[:4])}{more}" if held \
                    else f"it has no {PREFIX}{module}"
                raise UserError(f"{source} does not fit the recipe's net: st's {row.st} comes from "
                                f"{PREFIX}{name}, which the file lacks ({there}); check the recipe's "
                                f"net options (num_res_blocks, ch_mult, attn_resolutions, progressive)")
    known = set(wanted)
    for name in model:
        if name not in known and name not in BUFFERS:
            raise UserError(f"{source} holds the tensor {PREFIX}{name}, which the recipe's net has "
                            f"no place for; check the recipe's net options")
    return [name for name in model if name in known]


def import_checkpoint(src: str | Path, recipe: Recipe, out: str | Path, as_recipe: bool = False) -> dict:
    """Write the st checkpoint of score_sde / Soft Truncation checkpoint ``src`` to ``out``.

    The written recipe is the released function's (``released_recipe``: ``changes`` lists each
    setting that differs from ``recipe``); ``as_recipe`` keeps ``recipe`` and returns the same
    lines as ``warnings``.  A file trained with another sigma range than the recipe's is refused."""
    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"the folder of --out {out} does not exist")
    official = read(src)
    if recipe.sde.name in ("ve", "rve") and getattr(recipe.net, "time_input", None) == "t999":
        raise UserError(f"the recipe pairs a {recipe.sde.name.upper()} SDE with the time input "
                        "t999 (the positional embedding of 999 t), which no score_sde or Soft "
                        "Truncation VE/RVE network computes (discrete ones take the noise level's "
                        "index, continuous ones log sigma): the recipe's sde or net.time_input is "
                        f"not {src}'s")
    released = released_recipe(recipe)
    target = recipe if as_recipe else released.recipe
    mismatch = check_noise_table(official, target, str(src))
    warnings = list(released.changes) if as_recipe else []
    if mismatch and not as_recipe:
        raise UserError(mismatch)
    if mismatch:
        warnings.append(mismatch)
    raw, ema = convert(official, target, str(src))
    checkpoint.save(out, {**checkpoint.prefixed("model", raw), **checkpoint.prefixed("ema", ema)},
                    {"step": official.step, "recipe": target.to_dict(), "source": str(src)})
    return {"step": official.step, "tensors": len(raw), "parameters": sum(t.numel() for t in raw.values()),
            "changes": [] if as_recipe else released.changes, "warnings": warnings}
