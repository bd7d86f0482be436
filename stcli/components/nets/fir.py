"""FIR up/down-sampling of NCSN++ (StyleGAN2's ``upfirdn2d``, Song et al. 2021) in plain PyTorch.

``upfirdn2d(x, k, up, down, pad)`` inserts ``up - 1`` zeros between samples, pads, convolves
every channel with the 2-D kernel k (the normalised outer product of the 1-D taps, e.g.
[1, 3, 3, 1]) and keeps every ``down``-th sample.  For an even number of taps and factor 2 each
case used by NCSN++ is one depthwise convolution (``groups = C``), no reshapes or Python loops:

* ``upsample_2d``   = upfirdn2d(x, 4k, up=2, pad=(L/2, L/2 - 1)): a stride-2 transposed conv;
* ``downsample_2d`` = upfirdn2d(x, k, down=2, pad=(L/2 - 1, L/2 - 1)): a stride-2 conv;
* ``FIRUpConv``     = stride-2 transposed 3x3 conv, then upfirdn2d(., 4k, pad=(L-4)/2 + 1);
* ``FIRDownConv``   = upfirdn2d(x, k, pad=(L+K-3)/2), then a stride-2 3x3 conv.

upfirdn2d convolves (it flips k); correlating with the flipped kernel gives the same result.
The kernel is a non-persistent buffer: it follows the module's device and dtype-casts under
autocast, and is never part of a checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stcli.components.nets.layers import init_


def fir_kernel(taps: Sequence[float]) -> torch.Tensor:
    """The 2-D FIR kernel: outer product of ``taps`` with itself, normalised to sum 1.

    Computed in Python on the CPU, also inside ``torch.device("meta")``: the kernel is a
    non-persistent buffer (never in a checkpoint), so a net built on the meta device and filled
    from a checkpoint must already hold the real kernel.
    """
    taps = [float(v) for v in taps]
    if len(taps) < 2 or len(taps) % 2 or sum(taps) == 0:
        raise ValueError(f"FIR taps must be an even number (>= 2) with nonzero sum, got {taps}")
    total = sum(taps) ** 2
    return torch.tensor([[a * b / total for b in taps] for a in taps], dtype=torch.float32,
                        device="cpu")


def _depthwise(k: torch.Tensor, x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """k as a (C, 1, L, L) depthwise weight in x's dtype (a view of the one kernel)."""
    return (k.to(x.dtype) * gain).expand(x.shape[1], 1, *k.shape)


def fir_filter(x: torch.Tensor, k: torch.Tensor, pad: int, gain: float = 1.0) -> torch.Tensor:
    """upfirdn2d(x, gain k, pad=(pad, pad)) without resampling: a depthwise 'same'-type conv."""
    weight = _depthwise(k.flip(0, 1), x, gain)
    return F.conv2d(x, weight, padding=pad, groups=x.shape[1])


def upsample_2d(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Double H and W: zero insertion, then the FIR filter 4k (upfirdn2d with up=2)."""
    weight = _depthwise(k, x, gain=4.0)  # the transposed conv applies k unflipped: a convolution
    return F.conv_transpose2d(x, weight, stride=2, padding=k.shape[0] // 2 - 1, groups=x.shape[1])


def downsample_2d(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Halve H and W: the FIR filter k, then every second sample (upfirdn2d with down=2)."""
    weight = _depthwise(k.flip(0, 1), x)
    return F.conv2d(x, weight, stride=2, padding=k.shape[0] // 2 - 1, groups=x.shape[1])


class _FIR(nn.Module):
    def __init__(self, taps: Sequence[float]):
        super().__init__()
        self.register_buffer("kernel", fir_kernel(taps), persistent=False)


class FIRUpsample(_FIR):
    """FIR upsampling by 2 without parameters (score_sde ``upsample_2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_2d(x, self.kernel)


class FIRDownsample(_FIR):
    """FIR downsampling by 2 without parameters (score_sde ``downsample_2d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_2d(x, self.kernel)


class FIRUpConv(_FIR):
    """score_sde ``upsample_conv_2d``: stride-2 transposed 3x3 conv, then the FIR filter 4k.

    The weight is stored in the transposed-conv layout (in, out, 3, 3), so no flip or permute
    is needed per call; its fan-average initialisation is the same as for (out, in, 3, 3).  The
    bias is added after the filter, as score_sde does (inside the transposed conv the filter
    would scale it by 4 and blur it at the borders).
    """

    def __init__(self, in_ch: int, out_ch: int, taps: Sequence[float]):
        super().__init__(taps)
        self.conv = init_(nn.ConvTranspose2d(in_ch, out_ch, 3, stride=2, bias=False))
        self.bias = nn.Parameter(torch.zeros(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.kernel.shape[0] - 4) // 2 + 1  # p = L - 2 - (3 - 1); pad p/2 + 1 per side
        return fir_filter(self.conv(x), self.kernel, pad, gain=4.0) + self.bias[:, None, None]


class FIRDownConv(_FIR):
    """score_sde ``conv_downsample_2d``: the FIR filter k, then a stride-2 3x3 conv."""

    def __init__(self, in_ch: int, out_ch: int, taps: Sequence[float]):
        super().__init__(taps)
        self.conv = init_(nn.Conv2d(in_ch, out_ch, 3, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.kernel.shape[0] // 2  # p = L - 2 + (3 - 1); pad p/2 per side
        return self.conv(fir_filter(x, self.kernel, pad))
