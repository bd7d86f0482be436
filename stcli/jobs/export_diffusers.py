"""`st export CKPT --format diffusers --out FOLDER`: the score network as a diffusers UNet2DModel.

st's NCSN++ U-Net (stcli/components/nets/ncsnpp.py) is written onto the blocks diffusers has for score_sde's
nets: SkipDownBlock2D / AttnSkipDownBlock2D, UNetMidBlock2D, SkipUpBlock2D / AttnSkipUpBlock2D.
Those blocks compute BigGAN residual blocks whose sums are divided by sqrt(2), FIR (1, 3, 3, 1)
resampling inside the blocks, single-head attention (``attention_head_dim`` None), an input
pyramid that adds a 1x1 conv of the FIR-downsampled image to each downsampled level
(``input_skip``) and an output pyramid that sums GroupNorm-SiLU-conv3x3 heads through FIR
upsampling (``output_skip``).  Each st module is paired with the diffusers module that computes the
same function; a pyramid the net does not have is written as convolutions of zeros, which add
exactly 0.  Everything else those blocks cannot compute is refused (`refusals`), naming the
feature, before anything is written: an export is never an approximation.

The time input eta(t) is computed from t by the caller (docs/checkpoints.md, ``st_score``):
diffusers' Fourier embedding takes log(timestep), so a Fourier net gets the timestep e^eta and
divides its output by it; a positional net gets eta itself (diffusers rounds it to float32).
Uncentred [0, 1] data enter as 2x - 1 through ``center_input_sample``.

The folder: ``config.json`` and ``diffusion_pytorch_model.safetensors`` (UNet2DModel),
``scheduler_config.json`` where a diffusers scheduler computes the SDE's sigma(t) (VE:
ScoreSdeVeScheduler; VP: ScoreSdeVpScheduler), ``st_score.json`` (st's SDE, time input and output
convention) and the model card ``README.md``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from stcli.components.loading import load_model
from stcli.components.nets.ncsnpp import NCSNppModule, NCSNppSpec
from stcli.components.recipe import Recipe
from stcli.infra.errors import UserError
from stcli.infra.outputs import output_file, output_folder
from stcli.infra.runlock import TMP_PREFIX
from stcli.jobs.model_card import model_card

FIR_TAPS = [1.0, 3.0, 3.0, 1.0]  # the kernel diffusers' skip blocks resample with
ETA_LIMIT = 700.0  # e^eta is a normal float64 for |eta| below this
WRITES = ("config.json", "diffusion_pytorch_model.safetensors", "scheduler_config.json",
          "st_score.json", "README.md")


def export_diffusers(ckpt: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32",
                     overwrite: bool = False) -> dict:
    """Write the ``weights`` of ``ckpt`` to the folder ``out`` as a diffusers UNet2DModel with its
    scheduler configuration and model card; a UserError, with nothing written, for a net that
    diffusers' blocks cannot compute exactly."""
    if dtype != "fp32":
        raise UserError(f"--dtype {dtype}: a diffusers export is float32 (cast after loading, "
                        "e.g. UNet2DModel.from_pretrained(FOLDER, torch_dtype=torch.float16))")
    folder = _target(out, overwrite, ckpt)
    diffusers = _diffusers()
    loaded = load_model(ckpt, weights)
    recipe, weights = loaded.recipe, loaded.weights
    found = refusals(recipe)
    if found:
        raise UserError(f"cannot export {ckpt} to diffusers exactly: " + "; ".join(found))
    unet = _unet(diffusers, unet_config(recipe))
    unet.load_state_dict(diffusers_state(loaded.model.backbone, unet), strict=True, assign=True)
    assert not any(t.is_meta for t in (*unet.parameters(), *unet.buffers())), "a tensor was not mapped"
    scheduler, info = scheduler_config(recipe), score_info(recipe)
    scheduler_name = scheduler[0] if scheduler else None
    _write(folder, unet, diffusers, scheduler, info,
           model_card(recipe, loaded.step, weights, scheduler_name, info))
    return {"parameters": sum(p.numel() for p in unet.parameters()), "weights": weights,
            "scheduler": scheduler_name}


def _diffusers():
    try:
        import diffusers
    except ImportError:
        raise UserError("--format diffusers needs the diffusers package: pip install diffusers "
                        "(or, in st's checkout, pip install -e '.[diffusers]')") from None
    return diffusers


def _target(out: str | Path, overwrite: bool, ckpt: str | Path) -> Path:
    """The output folder: new or empty, or (with ``overwrite``) one whose export files may be
    replaced; checked before any work."""
    folder = output_folder(out, "--out")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise UserError(f"--out {folder} is a folder that is not empty; choose a new or empty "
                        "folder, or pass --overwrite (which replaces the files of an export)")
    for name in WRITES:
        if (folder / name).exists() or (folder / name).is_symlink():
            output_file(folder / name, f"--out {folder}: its", overwrite=True, inputs=[ckpt])
    return folder


# --- what diffusers' blocks cannot compute ----------------------------------------------------
def refusals(recipe: Recipe) -> list[str]:
    """One phrase per feature of the recipe's score model that UNet2DModel cannot compute."""
    net, channels = recipe.net, recipe.data.shape[0]
    if not isinstance(net, NCSNppSpec):
        return [f"net {net.name!r}: only st's NCSN++/DDPM++ U-Net is written onto diffusers' blocks"]
    checks = [
        (net.progressive_input == "residual", "progressive_input: residual: diffusers has no "
         "residual input pyramid (a FIR-downsampling conv of the pyramid added to each level); its "
         "skip blocks add a 1x1 conv of the FIR-downsampled image (input_skip)"),
        (net.progressive == "residual", "progressive: residual: diffusers' skip blocks sum output "
         "heads through FIR upsampling (output_skip), not a pyramid of FIR-upsampling convs"),
        (net.progressive_combine == "cat", "progressive_combine: cat: diffusers' skip blocks add "
         "the pyramid to the features"),
        (net.resblock_type == "ddpm", "resblock_type: ddpm: diffusers' skip blocks resample inside "
         "BigGAN residual blocks"),
        (not net.fir, "fir: false (nearest / 2x2-mean resampling): UNet2DModel's blocks that divide "
         "residual sums by sqrt(2) (the skip blocks) resample with the FIR kernel (1, 3, 3, 1), and "
         "it builds its other blocks with output_scale_factor 1"),
        (net.fir and net.fir_kernel != FIR_TAPS, f"fir_kernel: {net.fir_kernel}: diffusers' FIR "
         "kernel is (1, 3, 3, 1)"),
        (not net.skip_rescale, "skip_rescale: false: diffusers' skip blocks divide every residual "
         "sum by sqrt(2)"),
        (not net.conditional, "conditional: false: UNet2DModel always adds a time embedding"),
        (net.ch_mult[0] != 1, f"ch_mult[0] = {net.ch_mult[0]}: UNet2DModel's first convolution "
         "has nf*ch_mult[0] channels, st's has nf"),
        (channels != 3, f"{channels}-channel images: diffusers' skip blocks convolve 3-channel "
         "image pyramids"),
        (net.preconditioning != "none", f"preconditioning: {net.preconditioning}: UNet2DModel has "
         "no input/output preconditioning"),
    ]
    return [reason for failed, reason in checks if failed] + _time_refusals(recipe)


def _time_refusals(recipe: Recipe) -> list[str]:
    """A Fourier net's timestep is e^eta: eta over [eps, T] must keep it a normal float64."""
    net, sde = recipe.net, recipe.sde
    if net.embedding_type != "fourier":
        return []
    ends = sde.time_input(torch.tensor([sde.eps, sde.T], dtype=torch.float64), net.time_input)
    worst = float(ends.abs().max())
    if worst < ETA_LIMIT:
        return []
    return [f"time_input: {net.time_input} with embedding_type: fourier: diffusers' Fourier "
            f"embedding takes log(timestep), so the timestep is e^eta, and e^{worst:.4g} "
            "is not a float64"]


# --- the diffusers model -----------------------------------------------------------------------
def unet_config(recipe: Recipe) -> dict:
    """UNet2DModel's configuration for the recipe's (exportable) NCSN++ net."""
    net, (channels, size, _) = recipe.net, recipe.data.shape
    attn = [r in net.attn_resolutions for r in net.resolutions(size)]
    down = ["AttnSkipDownBlock2D" if a else "SkipDownBlock2D" for a in attn]
    up = ["AttnSkipUpBlock2D" if a else "SkipUpBlock2D" for a in reversed(attn)]
    positional = {"flip_sin_to_cos": False, "freq_shift": 1}  # [sin, cos], f_k = 1e4^(-k/(half-1))
    return {"sample_size": size, "in_channels": channels, "out_channels": channels,
            "center_input_sample": not recipe.data.zero_centered,
            "time_embedding_type": net.embedding_type, **positional,
            "down_block_types": down, "up_block_types": up,
            "block_out_channels": [net.nf * m for m in net.ch_mult],
            "layers_per_block": net.num_res_blocks, "mid_block_scale_factor": math.sqrt(2),
            "dropout": net.dropout, "act_fn": "silu", "attention_head_dim": None,
            "norm_num_groups": None, "norm_eps": 1e-6, "resnet_time_scale_shift": "default"}


def _unet(diffusers, config: dict) -> nn.Module:
    """UNet2DModel(**config) on the meta device (filled by `diffusers_state`)."""
    try:
        with torch.device("meta"):
            return diffusers.UNet2DModel(**config)
    except ValueError as err:  # a GroupNorm whose groups do not divide its channels
        raise UserError(f"cannot export to diffusers exactly: group-norm groups: diffusers' skip "
                        f"blocks cannot be built at widths {config['block_out_channels']} ({err}); "
                        "they use min(C/4, 32) groups, 32 in attention") from None


def diffusers_state(backbone: NCSNppModule, unet: nn.Module) -> dict[str, torch.Tensor]:
    """UNet2DModel's state dict holding the st backbone's function (UserError where a group
    norm of the two differs)."""
    state = {"conv_in": _copy(backbone.conv_in),
             "time_embedding.linear_1": _copy(backbone.embed.mlp[0]),
             "time_embedding.linear_2": _copy(backbone.embed.mlp[2])}
    if backbone.embed.fourier is not None:
        state["time_proj"] = {"weight": backbone.embed.fourier.W}
    for i, (level, block) in enumerate(zip(backbone.down, unet.down_blocks)):
        state[f"down_blocks.{i}"] = _down(level, block, f"down_blocks.{i}")
    mid = unet.mid_block
    state["mid_block"] = {"resnets.0": _resnet(backbone.mid[0], mid.resnets[0], "mid_block.resnets.0"),
                          "attentions.0": _attention(backbone.mid[1], mid.attentions[0], "mid_block"),
                          "resnets.1": _resnet(backbone.mid[2], mid.resnets[1], "mid_block.resnets.1")}
    for i, (level, block) in enumerate(zip(backbone.up, unet.up_blocks)):
        state[f"up_blocks.{i}"] = _up(level, block, f"up_blocks.{i}")
    head = backbone.up[-1].pyramid if backbone.spec.progressive == "output_skip" else backbone.head
    state["conv_norm_out"] = _norm(head.norm, unet.conv_norm_out, "conv_norm_out")
    state["conv_out"] = _copy(head.conv)
    return _flat(state)


def _down(level: nn.Module, block: nn.Module, where: str) -> dict:
    state = {f"resnets.{j}": _resnet(st, d, f"{where}.resnets.{j}")
             for j, (st, d) in enumerate(zip(level.blocks, block.resnets))}
    if hasattr(block, "attentions"):
        state.update({f"attentions.{j}": _attention(st, d, where)
                      for j, (st, d) in enumerate(zip(level.attns, block.attentions))})
    if level.resample is not None:
        state["resnet_down"] = _resnet(level.resample, block.resnet_down, f"{where}.resnet_down")
        state["skip_conv"] = _copy(level.pyramid) if level.pyramid is not None else _zeros(block.skip_conv)
    return state


def _up(level: nn.Module, block: nn.Module, where: str) -> dict:
    state = {f"resnets.{j}": _resnet(st, d, f"{where}.resnets.{j}")
             for j, (st, d) in enumerate(zip(level.blocks, block.resnets))}
    if hasattr(block, "attentions"):
        state["attentions.0"] = _attention(level.attns[0], block.attentions[0], where)
    if level.resample is not None:
        state["resnet_up"] = _resnet(level.resample, block.resnet_up, f"{where}.resnet_up")
        if level.pyramid is not None:  # output_skip: this level's head
            state["skip_norm"] = _norm(level.pyramid.norm, block.skip_norm, f"{where}.skip_norm")
            state["skip_conv"] = _copy(level.pyramid.conv)
        else:  # no output pyramid: heads of zeros
            state["skip_norm"] = {"weight": torch.ones(block.skip_norm.weight.shape),
                                  "bias": torch.zeros(block.skip_norm.bias.shape)}
            state["skip_conv"] = _zeros(block.skip_conv)
    return state


def _resnet(st: nn.Module, d: nn.Module, where: str) -> dict:
    """ResnetBlockpp -> ResnetBlock2D (the 1x1 skip conv exists in both or neither)."""
    assert (st.skip is None) == (d.conv_shortcut is None), where
    state = {"norm1": _norm(st.norm1, d.norm1, f"{where}.norm1"), "conv1": _copy(st.conv1),
             "time_emb_proj": _copy(st.temb_proj), "norm2": _norm(st.norm2, d.norm2, f"{where}.norm2"),
             "conv2": _copy(st.conv2)}
    if st.skip is not None:
        state["conv_shortcut"] = _copy(st.skip)
    return state


def _attention(st: nn.Module, d: nn.Module, where: str) -> dict:
    """AttnBlock (one 1x1 conv for q, k, v; a 1x1 output conv) -> Attention (Linear layers)."""
    q, k, v = st.qkv.weight[:, :, 0, 0].chunk(3)
    qb, kb, vb = st.qkv.bias.chunk(3)
    return {"group_norm": _norm(st.norm, d.group_norm, f"{where}.attention"),
            "to_q": {"weight": q, "bias": qb}, "to_k": {"weight": k, "bias": kb},
            "to_v": {"weight": v, "bias": vb},
            "to_out.0": {"weight": st.proj.weight[:, :, 0, 0], "bias": st.proj.bias}}


def _norm(st: nn.GroupNorm, d: nn.GroupNorm, where: str) -> dict:
    if (st.num_groups, st.num_channels, st.eps) != (d.num_groups, d.num_channels, d.eps):
        raise UserError(f"cannot export to diffusers exactly: group-norm groups: diffusers' {where} "
                        f"normalises {d.num_channels} channels in {d.num_groups} groups, st in "
                        f"{st.num_groups} (diffusers' skip blocks use min(C/4, 32) groups, 32 in "
                        "attention)")
    return {"weight": st.weight, "bias": st.bias}


def _copy(layer: nn.Module) -> dict:
    return {"weight": layer.weight, "bias": layer.bias}


def _zeros(layer: nn.Module) -> dict:
    return {name: torch.zeros(p.shape) for name, p in layer.named_parameters()}


def _flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out.update(_flat(value, name + ".") if isinstance(value, dict) else
                   {name: value.detach().clone().float()})
    return out


# --- the SDE: a diffusers scheduler where one is exact, st's description always -----------------
def scheduler_config(recipe: Recipe) -> tuple[str, dict] | None:
    """(diffusers scheduler class, its configuration) computing the recipe's sigma(t), or None."""
    sde, sample = recipe.sde, recipe.sample
    extra = {"num_train_timesteps": sample.steps} if hasattr(sample, "steps") else {}
    if sde.name == "ve":  # sigma = sigma_min (sigma_max / sigma_min)^t
        if getattr(sample, "corrector", "none") == "langevin":
            extra.update(snr=sample.snr, correct_steps=sample.n_corrector)
        return "ScoreSdeVeScheduler", {"sigma_min": sde.sigma_min, "sigma_max": sde.sigma_max,
                                       "sampling_eps": sde.eps, **extra}
    if sde.name == "vp":  # beta(t) = beta_min + t (beta_max - beta_min)
        return "ScoreSdeVpScheduler", {"beta_min": sde.beta_min, "beta_max": sde.beta_max,
                                       "sampling_eps": sde.eps, **extra}
    return None


def score_info(recipe: Recipe) -> dict:
    """``st_score.json``: what turns the UNet's output into st's score s(x, t)."""
    net = recipe.net
    output = "sigma_score" if net.scale_by_sigma else "noise"  # sigma s, or -sigma s
    return {"format": "st-diffusers/1", "recipe": recipe.name,
            "sde": recipe.sde.model_dump(mode="json"), "time_input": net.time_input,
            "output": output, "centered": recipe.data.zero_centered,
            "sample": recipe.sample.model_dump(mode="json"),
            "native_score": (net.embedding_type == "fourier" and net.time_input == "log_sigma"
                             and output == "sigma_score")}


def _scheduler(diffusers, name: str, config: dict):
    if name == "ScoreSdeVpScheduler":  # kept in diffusers' deprecated schedulers
        from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

        return ScoreSdeVpScheduler(**config)
    return getattr(diffusers, name)(**config)


# --- writing -------------------------------------------------------------------------------------
def _write(folder: Path, unet: nn.Module, diffusers, scheduler, info: dict, card: str) -> None:
    """Write every file into a temporary folder inside ``folder``, then move them in (replacing
    an earlier export's files, removing those this export does not write)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=TMP_PREFIX))
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        if scheduler is not None:
            _scheduler(diffusers, *scheduler).save_config(tmp)
        (tmp / "st_score.json").write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        for name in WRITES:
            (folder / name).unlink(missing_ok=True)
        for path in tmp.iterdir():
            os.replace(path, folder / path.name)
    except OSError as err:
        raise UserError(f"cannot write the export into {folder}: {err}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
