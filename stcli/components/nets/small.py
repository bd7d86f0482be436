"""Small, CPU-friendly backbones: a compact DDPM-style U-Net for images, a residual MLP for vectors.

Each module maps (x of shape (B, *shape), eta of shape (B,)) to a noise prediction of x's shape;
eta is the network time input chosen by ``time_input`` (the wrapper computes it from t).  The
output layers are zero-initialised, so a fresh network predicts exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from torch import nn

from stcli.components.nets.layers import (
    AttnBlock,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    conv3x3,
    group_norm,
    linear,
)
from stcli.infra.errors import UserError
from stcli.infra.registry import NETS, Component

TimeInput = Literal["t999", "log_sigma", "unbounded", "int_g2_sigma2"]
Embedding = Literal["fourier", "positional"]


class NetSpec(Component):
    """Fields every backbone spec shares."""

    time_input: TimeInput = "t999"
    fourier_scale: PositiveFloat = 16.0  # std of the Fourier frequencies (embedding "fourier")
    preconditioning: Literal["none", "edm"] = "none"  # see stcli.components.nets.ScoreModel
    sigma_data: PositiveFloat = 0.5  # the data's standard deviation, for preconditioning edm


def batch_eta(eta: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """eta as a (B,) tensor on x's device (a scalar is repeated over the batch)."""
    eta = torch.as_tensor(eta, device=x.device)
    if not eta.is_floating_point():
        eta = eta.to(x.dtype)
    return eta.expand(x.shape[0]) if eta.dim() == 0 else eta


# --- U-Net ------------------------------------------------------------------------------------
class _Stage(nn.Module):
    """A ResBlock, optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: AttnBlock | None):
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.res(h, temb)
        return h if self.attn is None else self.attn(h)


class UNetModule(nn.Module):
    """DDPM U-Net: levels of ResBlocks (+attention) with skip concatenations between paths."""

    def __init__(self, spec: SmallUNet, channels: int, size: int):
        super().__init__()
        nf, temb_dim = spec.nf, 4 * spec.nf
        self.temb = TimeEmbedding(nf, spec.embedding, spec.fourier_scale)
        self._res_args = dict(temb_dim=temb_dim, dropout=spec.dropout, skip_rescale=spec.skip_rescale)
        self.conv_in = conv3x3(channels, nf)
        self.down, skip_chs, ch, res = self._down_path(spec, size)
        self.mid = nn.ModuleList([self._stage(ch, ch, True), self._stage(ch, ch, False)])
        self.up = self._up_path(spec, skip_chs, ch, res)
        self.norm_out = group_norm(nf)
        self.conv_out = conv3x3(nf, channels, scale=0.0)

    def _stage(self, in_ch: int, out_ch: int, attn: bool) -> _Stage:
        res = ResBlock(in_ch, out_ch, **self._res_args)
        return _Stage(res, AttnBlock(out_ch) if attn else None)

    def _down_path(self, spec: SmallUNet, res: int):
        """Down blocks, the channels of every skip they leave, final channels and resolution."""
        blocks, ch, skip_chs = nn.ModuleList(), spec.nf, [spec.nf]
        for level, mult in enumerate(spec.ch_mult):
            for _ in range(spec.num_res_blocks):
                blocks.append(self._stage(ch, spec.nf * mult, res in spec.attn_resolutions))
                ch = spec.nf * mult
                skip_chs.append(ch)
            if level < len(spec.ch_mult) - 1:
                blocks.append(Downsample(ch))
                skip_chs.append(ch)
                res //= 2
        return blocks, skip_chs, ch, res

    def _up_path(self, spec: SmallUNet, skip_chs: list[int], ch: int, res: int) -> nn.ModuleList:
        """Up blocks, each ResBlock taking one skip (popped last-first) concatenated to h."""
        blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(spec.ch_mult))):
            for _ in range(spec.num_res_blocks + 1):
                out = spec.nf * mult
                blocks.append(self._stage(ch + skip_chs.pop(), out, res in spec.attn_resolutions))
                ch = out
            if level > 0:
                blocks.append(Upsample(ch))
                res *= 2
        return blocks

    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Noise prediction for x (B, C, H, W) at time inputs eta (B,)."""
        temb = self.temb(batch_eta(eta, x))
        hs = [self.conv_in(x)]
        for block in self.down:
            hs.append(block(hs[-1], temb) if isinstance(block, _Stage) else block(hs[-1]))
        h = hs[-1]
        for block in self.mid:
            h = block(h, temb)
        for block in self.up:
            is_stage = isinstance(block, _Stage)
            h = block(torch.cat([h, hs.pop()], dim=1), temb) if is_stage else block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@NETS.register
class SmallUNet(NetSpec):
    """Compact DDPM-style U-Net for images (C, H, W); H and W divisible by 2**(len(ch_mult)-1)."""

    name: Literal["unet"] = "unet"
    nf: PositiveInt = 32
    ch_mult: list[PositiveInt] = Field(default=[1, 2, 2], min_length=1)
    num_res_blocks: PositiveInt = 1
    attn_resolutions: list[PositiveInt] = []
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    embedding: Embedding = "positional"
    skip_rescale: bool = True

    def resolutions(self, size: int) -> list[int]:
        """The feature-map size at each level for an input of side ``size``."""
        return [size // 2**i for i in range(len(self.ch_mult))]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise UserError unless ``shape`` is (C, H, W) that this U-Net can process."""
        if len(shape) != 3:
            raise UserError(
                f"net 'unet' needs image data of shape (C, H, W), got shape {tuple(shape)}"
            )
        factor = 2 ** (len(self.ch_mult) - 1)
        _, hgt, wid = shape
        if hgt % factor or wid % factor or min(hgt, wid) < factor:
            raise UserError(
                f"net 'unet' with {len(self.ch_mult)} levels (ch_mult {self.ch_mult}) needs image "
                f"height and width divisible by {factor}; got {hgt}x{wid}"
            )
        missing = sorted(set(self.attn_resolutions) - set(self.resolutions(hgt)))
        if missing:
            raise UserError(
                f"net 'unet': attn_resolutions {missing} never occur; for {hgt}x{wid} images the "
                f"level resolutions are {self.resolutions(hgt)}"
            )

    def create(self, shape: tuple[int, ...]) -> nn.Module:
        """The U-Net module for images of per-sample shape ``shape`` = (C, H, W)."""
        self.check_shape(shape)
        return UNetModule(self, channels=shape[0], size=shape[1])


# --- MLP --------------------------------------------------------------------------------------
class _MLPBlock(nn.Module):
    """x + Linear(SiLU(Linear(SiLU(x)) + Linear(SiLU(temb))))."""

    def __init__(self, hidden: int, temb_dim: int):
        super().__init__()
        self.fc1, self.fc2 = linear(hidden, hidden), linear(hidden, hidden)
        self.temb_proj = linear(temb_dim, hidden)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        a = self.fc1(F.silu(h)) + self.temb_proj(F.silu(temb))
        return h + self.fc2(F.silu(a))


class MLPModule(nn.Module):
    """Residual MLP on vectors (B, D) with the time embedding added in every block."""

    def __init__(self, spec: MLP, dim: int):
        super().__init__()
        self.temb = TimeEmbedding(spec.hidden, spec.embedding, spec.fourier_scale)
        self.inp = linear(dim, spec.hidden)
        blocks = (_MLPBlock(spec.hidden, self.temb.out_dim) for _ in range(spec.layers))
        self.blocks = nn.ModuleList(blocks)
        self.out = linear(spec.hidden, dim, scale=0.0)

    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Noise prediction for x (B, D) at time inputs eta (B,)."""
        temb = self.temb(batch_eta(eta, x))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, temb)
        return self.out(F.silu(h))


@NETS.register
class MLP(NetSpec):
    """Residual MLP for vector data of shape (D,)."""

    name: Literal["mlp"] = "mlp"
    hidden: PositiveInt = 128
    layers: NonNegativeInt = 3
    embedding: Embedding = "positional"  # smooth in eta = 999 t (Fourier at scale 16 is not)

    def create(self, shape: tuple[int, ...]) -> nn.Module:
        """The MLP module for vectors of per-sample shape ``shape`` = (D,)."""
        if len(shape) != 1:
            raise UserError(f"net 'mlp' needs vector data of shape (D,), got shape {tuple(shape)}")
        return MLPModule(self, dim=shape[0])
