"""Shared building blocks of the score networks: time embeddings, residual and attention blocks.

Every layer uses the DDPM initialisation (variance scaling, fan-average, uniform; zero biases);
the last layer of each residual branch and every output projection start at zero, so blocks
begin as identities (or their skip path) and a fresh network predicts exactly zero.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FOURIER_SEED = 20240601  # fixed: the random Fourier frequencies never depend on the global seed


def init_(layer: nn.Conv2d | nn.Linear, scale: float = 1.0) -> nn.Module:
    """DDPM init in place: uniform variance scaling (fan_avg) with ``scale``; 0 gives zeros."""
    if scale == 0:
        nn.init.zeros_(layer.weight)
    else:
        nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, scale: float = 1.0) -> nn.Conv2d:
    """3x3 convolution with 'same' padding (halving the size when stride is 2)."""
    return init_(nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1), scale)


def conv1x1(in_ch: int, out_ch: int, scale: float = 1.0) -> nn.Conv2d:
    """1x1 convolution (a per-pixel linear map of channels)."""
    return init_(nn.Conv2d(in_ch, out_ch, 1), scale)


def linear(in_dim: int, out_dim: int, scale: float = 1.0) -> nn.Linear:
    """Linear layer with the DDPM init."""
    return init_(nn.Linear(in_dim, out_dim), scale)


def groups_for(ch: int) -> int:
    """GroupNorm groups for ``ch`` channels: the largest divisor of ch not above min(32, ch//4)."""
    g = max(1, min(32, ch // 4))
    while ch % g:
        g -= 1
    return g


def group_norm(ch: int, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm over ``ch`` channels with ``groups`` (default ``groups_for(ch)``) groups."""
    return nn.GroupNorm(groups or groups_for(ch), ch, eps=1e-6)


# --- time embeddings --------------------------------------------------------------------------
def sinusoidal_embedding(eta: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Transformer/DDPM embedding of real ``eta`` (B,): [sin(eta f_k), cos(eta f_k)], (B, dim).

    f_k = max_positions^(-k/(half-1)) for k < half = dim//2; an odd dim gets a zero last column.
    """
    half = dim // 2
    step = math.log(max_positions) / max(half - 1, 1)
    freqs = torch.exp(-step * torch.arange(half, dtype=eta.dtype, device=eta.device))
    args = eta[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class GaussianFourierEmbedding(nn.Module):
    """[sin(2 pi eta W), cos(2 pi eta W)] with fixed W ~ N(0, scale^2) of size dim//2."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"Fourier embedding dim must be even and >= 2, got {dim}")
        gen = torch.Generator().manual_seed(FOURIER_SEED)
        w = torch.randn(dim // 2, generator=gen, device="cpu") * scale  # no meta RNG (it is slow)
        self.register_buffer("W", w.to(torch.get_default_device()))

    def forward(self, eta: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * eta[:, None] * self.W.to(eta.dtype)[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class TimeEmbedding(nn.Module):
    """eta (B,) -> (B, out_dim): a Fourier or positional embedding, then Linear-SiLU-Linear.

    ``out_dim`` defaults to 4*dim (NCSN++/DDPM++ use 4*nf with dim = 2*nf Fourier features or
    dim = nf sinusoids).  The embedding is computed in eta's dtype (float64 keeps large
    arguments exact) and cast to the parameter dtype before the MLP.  The output has no final
    activation: consumers apply one.
    """

    def __init__(self, dim: int, kind: Literal["fourier", "positional"] = "positional",
                 fourier_scale: float = 16.0, out_dim: int | None = None):
        super().__init__()
        if kind not in ("fourier", "positional"):
            raise ValueError(f"unknown time embedding {kind!r}; use 'fourier' or 'positional'")
        self.dim, self.kind, self.out_dim = dim, kind, out_dim or 4 * dim
        self.fourier = GaussianFourierEmbedding(dim, fourier_scale) if kind == "fourier" else None
        self.mlp = nn.Sequential(linear(dim, self.out_dim), nn.SiLU(),
                                 linear(self.out_dim, self.out_dim))

    def embed(self, eta: torch.Tensor) -> torch.Tensor:
        """The raw (B, dim) embedding, before the MLP."""
        if self.fourier is not None:
            return self.fourier(eta)
        return sinusoidal_embedding(eta, self.dim)

    def forward(self, eta: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(eta).to(self.mlp[0].weight.dtype))


# --- convolutional blocks ---------------------------------------------------------------------
class ResBlock(nn.Module):
    """GroupNorm-SiLU-Conv3x3, + Linear(SiLU(temb)) per channel, GroupNorm-SiLU-Dropout-Conv3x3.

    The second conv is zero-initialised; a 1x1 conv maps the skip when channels change, and
    ``skip_rescale`` divides the sum by sqrt(2).
    """

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None = None, dropout: float = 0.0,
                 groups: int | None = None, skip_rescale: bool = True):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_ch, groups), conv3x3(in_ch, out_ch)
        self.temb_proj = linear(temb_dim, out_ch) if temb_dim else None
        self.norm2, self.dropout = group_norm(out_ch, groups), nn.Dropout(dropout)
        self.conv2 = conv3x3(out_ch, out_ch, scale=0.0)
        self.skip = conv1x1(in_ch, out_ch) if in_ch != out_ch else None
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb_proj is not None and temb is not None:
            h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.skip is None else self.skip(x)
        return (skip + h) * self.scale


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels: x + proj(softmax(q k^T / sqrt(C)) v).

    q, k, v come from one 1x1 conv of GroupNorm(x) (NCSN++'s NIN_0..2 stacked); the output
    projection is initialised with ``init_scale`` (default 0: zero).
    """

    def __init__(self, ch: int, groups: int | None = None, skip_rescale: bool = False,
                 init_scale: float = 0.0):
        super().__init__()
        self.norm = group_norm(ch, groups)
        self.qkv = conv1x1(ch, 3 * ch)
        self.proj = conv1x1(ch, ch, scale=init_scale)
        self.scale = 1 / math.sqrt(2) if skip_rescale else 1.0

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention output before the projection, shape (B, C, H, W)."""
        b, c, hgt, wid = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, hgt * wid).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        # (B, C, H, W) laid out as x: the transposed view is channels-last, which would give
        # proj's weight a gradient of another layout than the weight's (DDP warns of it)
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        return out.transpose(-1, -2).reshape(b, c, hgt, wid).contiguous(memory_format=layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.proj(self.attend(x))) * self.scale


class Downsample(nn.Module):
    """Halve the spatial size with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = conv3x3(ch, ch, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the spatial size: nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = conv3x3(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
