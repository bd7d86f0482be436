"""benchmarks/score_sde_reference.py: the upfirdn2d shim that stands in for score_sde's CUDA op
(checked against scipy's 2-D convolution), and a clear error for a path that is no checkout."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from score_sde_reference import load, upfirdn2d  # noqa: E402


def scipy_upfirdn2d(x: np.ndarray, k: np.ndarray, up: int, down: int, pad: tuple[int, int]):
    """Zero insertion, padding (negative = crop), true 2-D convolution, decimation."""
    h, w = x.shape
    z = np.zeros((h * up, w * up))
    z[::up, ::up] = x
    p0, p1 = pad
    z = np.pad(z, [(max(p0, 0), max(p1, 0))] * 2)
    z = z[-min(p0, 0) or None: z.shape[0] + min(p1, 0) or None,
          -min(p0, 0) or None: z.shape[1] + min(p1, 0) or None]
    return convolve2d(z, k, mode="valid")[::down, ::down]


@pytest.mark.parametrize("up, down, pad", [(2, 1, (2, 1)), (1, 2, (1, 1)), (1, 1, (0, 0)),
                                           (2, 1, (-1, 2))])
def test_upfirdn2d_matches_scipy(up, down, pad):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64)
    k = torch.randn(4, 3, generator=gen, dtype=torch.float64)  # asymmetric: catches a missing flip
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    for n in range(2):
        for c in range(3):
            want = scipy_upfirdn2d(x[n, c].numpy(), k.numpy(), up, down, pad)
            np.testing.assert_allclose(got[n, c].numpy(), want, rtol=1e-12, atol=1e-12)


def test_a_path_that_is_no_checkout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a score_sde_pytorch checkout"):
        load(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        load(tmp_path / "missing")
