"""NCSN++ and DDPM++ (Song et al. 2021, score_sde ``models/ncsnpp.py``): one U-Net, two entries.

The two published networks differ only in options (score_sde's continuous CIFAR-10 configs):
NCSN++ has FIR resampling, a residual input pyramid and Gaussian Fourier features of
eta = log sigma; DDPM++ has nearest/average resampling, no pyramids and sinusoidal features of
eta = 999 t.  Both use BigGAN residual blocks, attention at 16x16, skip rescaling and a
zero-initialised output.  UNCSN++ / UDDPM++ (App. C.1) are the same nets with ``time_input:
unbounded`` / ``int_g2_sigma2``.

Output convention: the noise prediction, s = -eps(x, eta)/sigma.  score_sde's NCSN++ (VE
configs, ``scale_by_sigma``) returns a score instead: its last layer computes h = sigma s and the
net divides by sigma.  With ``scale_by_sigma`` this net computes the same h and returns the noise
prediction -h (the division by sigma is the ScoreModel's), so a score_sde NCSN++ checkpoint gives
exactly its published function.  Uncentred [0, 1] data are mapped to 2x - 1 before the net by the
ScoreModel (score_sde does it inside the net).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, PositiveInt, field_validator
from torch import nn

from stcli.components.nets.fir import FIRDownConv, FIRDownsample, FIRUpConv, FIRUpsample
from stcli.components.nets.layers import AttnBlock, TimeEmbedding, conv1x1, conv3x3, group_norm, init_, linear
from stcli.components.nets.small import NetSpec, TimeInput, batch_eta
from stcli.infra.errors import UserError
from stcli.infra.registry import NETS

Progressive = Literal["none", "output_skip", "residual"]
ProgressiveInput = Literal["none", "input_skip", "residual"]


class NCSNppSpec(NetSpec):
    """Every option of score_sde's NCSN++ family (its ``config.model`` fields)."""

    nf: PositiveInt = 128
    ch_mult: list[PositiveInt] = Field(default=[1, 2, 2, 2], min_length=1)
    num_res_blocks: PositiveInt = 4
    attn_resolutions: list[PositiveInt] = [16]
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)
    resblock_type: Literal["biggan", "ddpm"] = "biggan"
    fir: bool = False
    fir_kernel: list[float] = [1.0, 3.0, 3.0, 1.0]
    progressive: Progressive = "none"
    progressive_input: ProgressiveInput = "none"
    progressive_combine: Literal["sum", "cat"] = "sum"
    skip_rescale: bool = True
    embedding_type: Literal["fourier", "positional"] = "positional"
    init_scale: NonNegativeFloat = 0.0  # scale of the last conv of each branch; 0 = zeros
    conditional: bool = True  # time-conditional (no time embedding at all if false)
    resamp_with_conv: bool = True
    scale_by_sigma: bool = False  # the last layer outputs sigma * score (= -noise), as score_sde's VE nets

    @field_validator("fir_kernel")
    @classmethod
    def _even_taps(cls, taps: list[float]) -> list[float]:
        if len(taps) < 2 or len(taps) % 2 or sum(taps) == 0:
            raise ValueError("fir_kernel needs an even number (>= 2) of taps with a nonzero sum")
        return taps

    def resolutions(self, size: int) -> list[int]:
        """The feature-map side at each level for an input of side ``size``."""
        return [size // 2**i for i in range(len(self.ch_mult))]

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Raise UserError unless ``shape`` is a square (C, H, H) image this net can process."""
        if len(shape) != 3 or shape[1] != shape[2]:
            raise UserError(f"net {self.name!r} needs square images (C, H, H), got {tuple(shape)}")
        factor, size = 2 ** (len(self.ch_mult) - 1), shape[1]
        if size % factor:
            raise UserError(f"net {self.name!r} with {len(self.ch_mult)} levels needs a side "
                            f"divisible by {factor}; got {size}")
        missing = sorted(set(self.attn_resolutions) - set(self.resolutions(size)))
        if missing:
            raise UserError(f"net {self.name!r}: attn_resolutions {missing} never occur; for "
                            f"{size}x{size} images the levels are {self.resolutions(size)}")

    def create(self, shape: tuple[int, ...]) -> nn.Module:
        """The U-Net for images of per-sample shape ``shape`` = (C, H, H)."""
        self.check_shape(shape)
        return NCSNppModule(self, channels=shape[0], size=shape[1])


@NETS.register
class NCSNpp(NCSNppSpec):
    """NCSN++ (score_sde ``ve/cifar10_ncsnpp_continuous``); UNCSN++ with time_input unbounded."""

    name: Literal["ncsnpp"] = "ncsnpp"
    time_input: TimeInput = "log_sigma"
    fir: bool = True
    progressive_input: ProgressiveInput = "residual"
    embedding_type: Literal["fourier", "positional"] = "fourier"
    scale_by_sigma: bool = True


@NETS.register
class DDPMpp(NCSNppSpec):
    """DDPM++ (score_sde ``vp/cifar10_ddpmpp_continuous``); UDDPM++: time_input int_g2_sigma2."""

    name: Literal["ddpmpp"] = "ddpmpp"


# --- resampling -------------------------------------------------------------------------------
def upsampler(in_ch: int, out_ch: int, with_conv: bool, spec: NCSNppSpec) -> nn.Module:
    """score_sde ``layerspp.Upsample``: FIR or nearest x2, with or without a 3x3 conv."""
    taps = spec.fir_kernel
    if spec.fir:
        return FIRUpConv(in_ch, out_ch, taps) if with_conv else FIRUpsample(taps)
    up = nn.Upsample(scale_factor=2.0, mode="nearest")
    return nn.Sequential(up, conv3x3(in_ch, out_ch)) if with_conv else up


def downsampler(in_ch: int, out_ch: int, with_conv: bool, spec: NCSNppSpec) -> nn.Module:
    """score_sde ``layerspp.Downsample``: FIR or 2x2 mean, or a stride-2 3x3 conv (padded 0,1)."""
    taps = spec.fir_kernel
    if spec.fir:
        return FIRDownConv(in_ch, out_ch, taps) if with_conv else FIRDownsample(taps)
    if with_conv:
        conv = init_(nn.Conv2d(in_ch, out_ch, 3, stride=2))
        return nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), conv)
    return nn.AvgPool2d(2)


# --- blocks -----------------------------------------------------------------------------------
class ResnetBlockpp(nn.Module):
    """score_sde ``ResnetBlockBigGANpp`` / ``ResnetBlockDDPMpp`` (the latter: no ``resample``).

    h = Conv(resample(act(GN(x)))) + Dense(act(temb)); h = Conv_init(Dropout(act(GN(h))));
    out = (skip(resample(x)) + h) / sqrt(2) with ``skip_rescale``.  The 1x1 skip conv exists
    when the channels change or the block resamples.  ``temb`` arrives already activated.
    """

    def __init__(self, in_ch: int, out_ch: int, spec: NCSNppSpec,
                 resample: nn.Module | None = None):
        super().__init__()
        temb_dim = 4 * spec.nf if spec.conditional else None
        self.norm1, self.resample = group_norm(in_ch), resample
        self.conv1 = conv3x3(in_ch, out_ch)
        self.temb_proj = linear(temb_dim, out_ch) if temb_dim else None
        self.norm2, self.dropout = group_norm(out_ch), nn.Dropout(spec.dropout)
        self.conv2 = conv3x3(out_ch, out_ch, scale=spec.init_scale)
        self.skip = conv1x1(in_ch, out_ch) if in_ch != out_ch or resample is not None else None
        self.scale = 1 / math.sqrt(2) if spec.skip_rescale else 1.0

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        if self.resample is not None:
            h, x = self.resample(h), self.resample(x)
        h = self.conv1(h)
        if self.temb_proj is not None:
            h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        x = x if self.skip is None else self.skip(x)
        return (x + h).mul_(self.scale) if self.scale != 1.0 else x + h


class OutputHead(nn.Module):
    """act(GroupNorm(h)) then a 3x3 conv (the output of each level in the progressive paths)."""

    def __init__(self, in_ch: int, out_ch: int, scale: float = 1.0):
        super().__init__()
        self.norm, self.conv = group_norm(in_ch), conv3x3(in_ch, out_ch, scale=scale)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv(F.silu(self.norm(h)))


class Level(nn.Module):
    """One resolution of a path: residual blocks, attention, resampling and pyramid modules."""

    def __init__(self):
        super().__init__()
        self.blocks, self.attns = nn.ModuleList(), nn.ModuleList()
        self.resample: nn.Module | None = None
        self.pyramid: nn.Module | None = None


# --- the network ------------------------------------------------------------------------------
class NCSNppModule(nn.Module):
    """The NCSN++ U-Net: noise prediction for x (B, C, H, H) at time inputs eta (B,)."""

    def __init__(self, spec: NCSNppSpec, channels: int, size: int):
        super().__init__()
        self.spec, nf = spec, spec.nf
        self.scale = 1 / math.sqrt(2) if spec.skip_rescale else 1.0
        self.embed = None
        if spec.conditional:
            fourier = spec.embedding_type == "fourier"
            self.embed = TimeEmbedding(2 * nf if fourier else nf, spec.embedding_type,
                                       spec.fourier_scale, out_dim=4 * nf)
        attn = [r in spec.attn_resolutions for r in spec.resolutions(size)]
        self.conv_in = conv3x3(channels, nf)
        self.down, skip_chs, ch = self._down_path(spec, channels, attn)
        self.mid = nn.ModuleList([ResnetBlockpp(ch, ch, spec), self._attn(ch),
                                  ResnetBlockpp(ch, ch, spec)])
        self.up, ch = self._up_path(spec, channels, skip_chs, ch, attn)
        if spec.progressive_input == "input_skip":
            self.pyramid_down = downsampler(channels, channels, False, spec)
        if spec.progressive == "output_skip":
            self.pyramid_up = upsampler(channels, channels, False, spec)
        else:
            self.head = OutputHead(ch, channels, scale=spec.init_scale)

    def _attn(self, ch: int) -> AttnBlock:
        return AttnBlock(ch, skip_rescale=self.spec.skip_rescale, init_scale=self.spec.init_scale)

    def _down_path(self, spec: NCSNppSpec, channels: int, attn: list[bool]):
        """Levels of the contracting path, the channels of every skip they leave, final channels."""
        levels, ch, skip_chs, pyr_ch = nn.ModuleList(), spec.nf, [spec.nf], channels
        for i, mult in enumerate(spec.ch_mult):
            level = Level()
            for _ in range(spec.num_res_blocks):
                level.blocks.append(ResnetBlockpp(ch, spec.nf * mult, spec))
                ch = spec.nf * mult
                level.attns.append(self._attn(ch) if attn[i] else nn.Identity())
                skip_chs.append(ch)
            if i < len(spec.ch_mult) - 1:
                level.resample = self._down_block(spec, ch)
                if spec.progressive_input == "input_skip":
                    level.pyramid = conv1x1(channels, ch)  # score_sde Combine
                    ch *= 2 if spec.progressive_combine == "cat" else 1
                elif spec.progressive_input == "residual":
                    level.pyramid, pyr_ch = downsampler(pyr_ch, ch, True, spec), ch
                skip_chs.append(ch)
            levels.append(level)
        return levels, skip_chs, ch

    def _up_path(self, spec: NCSNppSpec, channels: int, skip_chs: list[int], ch: int,
                 attn: list[bool]):
        """Levels of the expanding path (top level first), and the final channels."""
        levels, top, pyr_ch = nn.ModuleList(), len(spec.ch_mult) - 1, ch
        for i in reversed(range(len(spec.ch_mult))):
            level, out = Level(), spec.nf * spec.ch_mult[i]
            for _ in range(spec.num_res_blocks + 1):
                level.blocks.append(ResnetBlockpp(ch + skip_chs.pop(), out, spec))
                ch = out
            level.attns.append(self._attn(ch) if attn[i] else nn.Identity())
            if spec.progressive == "output_skip":
                level.pyramid = OutputHead(ch, channels, scale=spec.init_scale)
            elif spec.progressive == "residual":
                head = i == top
                level.pyramid = OutputHead(ch, ch) if head else upsampler(pyr_ch, ch, True, spec)
                pyr_ch = ch
            if i > 0:
                level.resample = self._up_block(spec, ch)
            levels.append(level)
        return levels, ch

    def _down_block(self, spec: NCSNppSpec, ch: int) -> nn.Module:
        if spec.resblock_type == "ddpm":
            return downsampler(ch, ch, spec.resamp_with_conv, spec)
        fir = FIRDownsample(spec.fir_kernel) if spec.fir else nn.AvgPool2d(2)
        return ResnetBlockpp(ch, ch, spec, resample=fir)

    def _up_block(self, spec: NCSNppSpec, ch: int) -> nn.Module:
        if spec.resblock_type == "ddpm":
            return upsampler(ch, ch, spec.resamp_with_conv, spec)
        fir = FIRUpsample(spec.fir_kernel) if spec.fir else nn.Upsample(scale_factor=2.0)
        return ResnetBlockpp(ch, ch, spec, resample=fir)

    @staticmethod
    def _resample(module: nn.Module, h: torch.Tensor, temb: torch.Tensor | None) -> torch.Tensor:
        return module(h, temb) if isinstance(module, ResnetBlockpp) else module(h)

    # --- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
        """Noise prediction for x (B, C, H, H) at time inputs eta (B,) (score_sde's order)."""
        temb = None if self.embed is None else F.silu(self.embed(batch_eta(eta, x)))
        hs = self._down(x, temb)
        h = self.mid[0](hs[-1], temb)
        h = self.mid[2](self.mid[1](h), temb)
        out = self._up(h, hs, temb)
        return -out if self.spec.scale_by_sigma else out  # sigma s = -noise

    def _down(self, x: torch.Tensor, temb: torch.Tensor | None) -> list[torch.Tensor]:
        """The contracting path; returns every skip activation (the last is the deepest)."""
        mode, pyramid, hs = self.spec.progressive_input, x, [self.conv_in(x)]
        for level in self.down:
            for block, attn in zip(level.blocks, level.attns):
                hs.append(attn(block(hs[-1], temb)))
            if level.resample is None:
                continue
            h = self._resample(level.resample, hs[-1], temb)
            if mode == "input_skip":
                pyramid = self.pyramid_down(pyramid)
                h = self._combine(level.pyramid(pyramid), h)
            elif mode == "residual":
                pyramid = h = self._rescale(level.pyramid(pyramid) + h)
            hs.append(h)
        return hs

    def _rescale(self, s: torch.Tensor) -> torch.Tensor:
        """A fresh sum divided by sqrt(2) in place (``skip_rescale``)."""
        return s.mul_(self.scale) if self.scale != 1.0 else s

    def _combine(self, p: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([p, h], dim=1) if self.spec.progressive_combine == "cat" else p + h

    def _up(self, h: torch.Tensor, hs: list[torch.Tensor], temb: torch.Tensor | None):
        """The expanding path with its output pyramid; returns the network output."""
        mode, pyramid = self.spec.progressive, None
        for level in self.up:
            for block in level.blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
            h = level.attns[0](h)
            if mode == "output_skip":
                out = level.pyramid(h)
                pyramid = out if pyramid is None else self.pyramid_up(pyramid) + out
            elif mode == "residual":
                if pyramid is None:
                    pyramid = level.pyramid(h)
                else:
                    pyramid = h = self._rescale(level.pyramid(pyramid) + h)
            if level.resample is not None:
                h = self._resample(level.resample, h, temb)
        return pyramid if mode == "output_skip" else self.head(h)
