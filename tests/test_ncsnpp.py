"""NCSN++ / DDPM++ (ncsnpp, ddpmpp): shapes, gradients, FIR resampling, published sizes, time
inputs and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stcli.components.nets import ScoreModel
from stcli.components.nets.fir import FIRDownConv, FIRUpConv, downsample_2d, fir_kernel, upsample_2d
from stcli.components.sdes import TIME_INPUTS
from stcli.infra.errors import UserError
from stcli.infra.registry import NETS, SDES


def _perturb_(net: torch.nn.Module, std: float = 0.05) -> None:
    """Add noise to every parameter, so zero-initialised layers no longer block gradients."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))


SMALL = dict(nf=8, num_res_blocks=1, dropout=0.0)
SHAPES = [  # (net, side, options): every path and block type at the four resolutions
    ("ncsnpp", 32, dict(ch_mult=[1, 2, 2])),
    ("ddpmpp", 32, dict(ch_mult=[1, 2, 2], resblock_type="ddpm", progressive="residual")),
    ("ddpmpp", 48, dict(ch_mult=[1, 2, 2], attn_resolutions=[12], conditional=False,
                        progressive_input="residual", resamp_with_conv=False)),
    ("ncsnpp", 64, dict(ch_mult=[1, 2, 2, 2], progressive="output_skip",
                        progressive_input="input_skip", progressive_combine="cat")),
    ("ncsnpp", 64, dict(ch_mult=[1, 2, 2, 2], resblock_type="ddpm", progressive="residual",
                        embedding_type="positional", skip_rescale=False)),
    ("ncsnpp", 256, dict(ch_mult=[1, 1, 2, 2, 2, 2, 2], progressive="output_skip",
                         progressive_input="input_skip")),
]


@pytest.mark.parametrize("name, side, options", SHAPES, ids=lambda v: str(v))
def test_shape_zero_start_and_gradients_reach_every_parameter(name, side, options):
    torch.manual_seed(0)
    net = NETS.build(name, shape=(3, side, side), **SMALL, **options)
    x, eta = torch.randn(2, 3, side, side), torch.tensor([-1.0, 2.0])
    out = net(x, eta)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # init_scale 0: the output conv starts at zero
    _perturb_(net)
    out = net(x, eta)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


def test_defaults_are_the_cifar10_continuous_configs():
    ncsn, ddpm = NETS.validate("ncsnpp"), NETS.validate("ddpmpp")
    assert (ncsn.time_input, ncsn.fir, ncsn.progressive_input, ncsn.embedding_type) == (
        "log_sigma", True, "residual", "fourier")
    assert (ddpm.time_input, ddpm.fir, ddpm.progressive_input, ddpm.embedding_type) == (
        "t999", False, "none", "positional")
    for spec in (ncsn, ddpm):
        assert (spec.nf, spec.ch_mult, spec.num_res_blocks, spec.attn_resolutions) == (
            128, [1, 2, 2, 2], 4, [16])
        assert (spec.resblock_type, spec.progressive, spec.dropout, spec.init_scale) == (
            "biggan", "none", 0.1, 0.0)


@pytest.mark.parametrize("options, message", [
    (dict(shape=(3, 32, 48)), "square"),
    (dict(shape=(3, 36, 36)), "divisible by 8"),
    (dict(shape=(3, 32, 32), attn_resolutions=[12]), "never occur"),
    (dict(shape=(2,)), "square"),
])
def test_bad_shapes_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        NETS.build("ddpmpp", **options)


def test_bad_fir_kernel_is_a_user_error():
    with pytest.raises(UserError, match="fir_kernel"):
        NETS.validate("ncsnpp", fir_kernel=[1, 2, 1])


# --- FIR resampling against a direct computation ----------------------------------------------
def ref_upfirdn2d(x, taps, up=1, down=1, pad=(0, 0), gain=1.0):
    """Zero insertion, padding, the true 2-D convolution with the outer-product kernel written
    out as a sum of shifted copies, then striding (StyleGAN2 / score_sde ``upfirdn2d``)."""
    k = torch.outer(torch.tensor(taps, dtype=x.dtype), torch.tensor(taps, dtype=x.dtype))
    k = gain * k / k.sum()
    b, c, h, w = x.shape
    u = torch.zeros(b, c, h * up, w * up, dtype=x.dtype)
    u[..., ::up, ::up] = x
    u = F.pad(u, (pad[0], pad[1], pad[0], pad[1]))
    n = k.shape[0]
    oh, ow = u.shape[-2] - n + 1, u.shape[-1] - n + 1
    y = sum(k[n - 1 - i, n - 1 - j] * u[..., i:i + oh, j:j + ow]
            for i in range(n) for j in range(n))
    return y[..., ::down, ::down]


def ref_conv(x, w, stride=1):
    """Cross-correlation (B, I, H, W) x (O, I, K, K), written out as shifted channel mixes."""
    n = w.shape[-1]
    oh, ow = x.shape[-2] - n + 1, x.shape[-1] - n + 1
    y = sum(torch.einsum("oi,bihw->bohw", w[:, :, i, j], x[..., i:i + oh, j:j + ow])
            for i in range(n) for j in range(n))
    return y[..., ::stride, ::stride]


TAPS = [[1, 3, 3, 1], [1, 1], [2, 1, 0.5, 3], [1, 2, 3, 3, 2, 1]]


@pytest.mark.parametrize("taps", TAPS, ids=str)
def test_fir_resampling_equals_the_direct_computation(taps):
    torch.manual_seed(0)
    x, k, p = torch.randn(2, 3, 8, 8), fir_kernel(taps), len(taps) - 2
    up = ref_upfirdn2d(x, taps, up=2, pad=((p + 1) // 2 + 1, p // 2), gain=4.0)
    down = ref_upfirdn2d(x, taps, down=2, pad=((p + 1) // 2, p // 2))
    torch.testing.assert_close(upsample_2d(x, k), up, rtol=0, atol=1e-6)
    torch.testing.assert_close(downsample_2d(x, k), down, rtol=0, atol=1e-6)


@pytest.mark.parametrize("taps", TAPS[::2], ids=str)
def test_fir_convolutions_equal_the_direct_computation(taps):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    up, down = FIRUpConv(3, 5, taps), FIRDownConv(3, 5, taps)
    with torch.no_grad():  # transposed conv = zero insertion, full padding, flipped correlation
        up.bias.normal_(), down.conv.bias.normal_()  # (zero at init: make them count)
        u = torch.zeros(2, 3, 15, 15)
        u[..., ::2, ::2] = x
        w = up.conv.weight.transpose(0, 1).flip(2, 3)
        y = ref_conv(F.pad(u, (2, 2, 2, 2)), w)
        p = len(taps) - 4  # score_sde upsample_conv_2d: p = (L - 2) - (3 - 1); bias added last
        ref_up = ref_upfirdn2d(y, taps, pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0) \
            + up.bias[:, None, None]
        p = len(taps)  # score_sde conv_downsample_2d: p = (L - 2) + (3 - 1)
        v = ref_upfirdn2d(x, taps, pad=((p + 1) // 2, p // 2))
        ref_down = ref_conv(v, down.conv.weight, stride=2) + down.conv.bias[:, None, None]
        torch.testing.assert_close(up(x), ref_up, rtol=0, atol=1e-6)
        torch.testing.assert_close(down(x), ref_down, rtol=0, atol=1e-6)
    assert up(x).shape == (2, 5, 16, 16) and down(x).shape == (2, 5, 4, 4)


# --- published sizes ----------------------------------------------------------------------------
DEEP = dict(num_res_blocks=8)
CELEBA64 = dict(embedding_type="positional")  # score_sde's CelebA NCSN++ embeds positionally
HQ256 = dict(ch_mult=[1, 1, 2, 2, 2, 2, 2], num_res_blocks=2, dropout=0.0,
             progressive="output_skip", progressive_input="input_skip")


@pytest.mark.parametrize("name, side, options, millions", [
    ("ddpmpp", 32, {}, 61.80),
    ("ddpmpp", 32, DEEP, 106.63),
    ("ncsnpp", 32, {}, 62.76),
    ("ncsnpp", 32, DEEP, 107.59),
    ("ncsnpp", 64, CELEBA64, 62.69),
    ("ncsnpp", 256, HQ256, 65.57),
])
def test_parameter_counts_match_the_published_configurations(name, side, options, millions):
    with torch.device("meta"):
        net = NETS.build(name, shape=(3, side, side), **options)
    count = sum(p.numel() for p in net.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=5e-3)
    assert round(count, 2) == millions  # in fact equal to the published digits


# --- time inputs as the nets see them -------------------------------------------------------
SDE_PARAMS = {  # the SDEs of the shipped recipes
    "ve": dict(sigma_min=0.01, sigma_max=90.0),
    "vp": dict(beta_min=0.1, beta_max=20.0),
    "subvp": dict(beta_min=0.1, beta_max=20.0),
    "rve": dict(sigma_min=1e-3, sigma_max=90.0),
}


@pytest.mark.parametrize("sde_name", SDE_PARAMS)
@pytest.mark.parametrize("eps", [1e-5, 5e-5])
def test_time_inputs_in_float32_and_their_embeddings_are_finite_and_monotone(sde_name, eps):
    """tests/test_sdes.py checks eta(t) in float64; the nets get it cast to float32 and embedded."""
    sde = SDES.build(sde_name, eps=eps, **SDE_PARAMS[sde_name])
    t = torch.logspace(math.log10(eps), 0, 500, dtype=torch.float64)
    for kind in TIME_INPUTS:
        eta = sde.time_input(t, kind).float()
        assert torch.isfinite(eta).all() and (eta.diff() >= 0).all(), kind
        assert (eta[-1] > eta[0]).item(), kind
        for name in ("ncsnpp", "ddpmpp"):
            embed = NETS.build(name, shape=(3, 8, 8), nf=8, ch_mult=[1], attn_resolutions=[]).embed
            assert torch.isfinite(embed(eta)).all(), (kind, name)


def test_score_model_output_is_finite_at_eps_and_T():
    torch.manual_seed(0)
    sde = SDES.build("rve", eps=1e-5, sigma_min=1e-3, sigma_max=90.0)
    net = NETS.build("ncsnpp", shape=(3, 16, 16), **SMALL, ch_mult=[1, 2], time_input="unbounded")
    _perturb_(net)
    model = ScoreModel(net, sde, "unbounded")
    x = torch.randn(2, 3, 16, 16)
    for t in (1e-5, 1.0):
        out = model.score(x * float(sde.std(t)), torch.full((2,), t))
        assert torch.isfinite(out).all()


def test_scale_by_sigma_negates_the_output_and_uncentred_data_enter_as_2x_minus_1():
    """score_sde's VE NCSN++ outputs h = sigma * score (st returns -h, the noise prediction) and
    maps data in [0, 1] to 2x - 1 before its first layer; st's DDPM++ outputs the noise."""
    torch.manual_seed(0)
    assert NETS.validate("ncsnpp").scale_by_sigma and not NETS.validate("ddpmpp").scale_by_sigma
    opts = dict(shape=(3, 16, 16), **SMALL, ch_mult=[1, 2])
    signed = NETS.build("ncsnpp", **opts)
    _perturb_(signed)
    plain = NETS.build("ncsnpp", **opts, scale_by_sigma=False)
    plain.load_state_dict(signed.state_dict())
    x, eta = torch.rand(2, 3, 16, 16), torch.tensor([0.1, 2.0])
    with torch.no_grad():
        torch.testing.assert_close(signed(x, eta), -plain(x, eta), rtol=0, atol=0)
        sde = SDES.build("ve")
        t = torch.tensor([0.3, 0.9])
        uncentred = ScoreModel(signed, sde, "log_sigma", centered=False)
        centred = ScoreModel(signed, sde, "log_sigma")
        torch.testing.assert_close(uncentred.score(x, t), centred.score(2 * x - 1, t), rtol=0, atol=0)
        assert not torch.allclose(uncentred.score(x, t), centred.score(x, t))


# --- bf16 autocast --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["ncsnpp", "ddpmpp"])
def test_bf16_autocast_matches_fp32(name):
    """bf16 keeps 8 significant bits (unit roundoff u = 2^-8 ~ 3.9e-3).  Each of the ~D = 25
    convolutions / linears on the path rounds its inputs and weights once; independent
    rounding errors add in quadrature, so the relative error of the output is about
    u sqrt(2D) ~ 3e-2.  We allow 5e-2 (measured: 1.5e-2 and 1.8e-2); a real bug (a skipped
    block, a wrong scale, a dtype that overflows) moves the output by O(1)."""
    torch.manual_seed(0)
    net = NETS.build(name, shape=(3, 16, 16), nf=16, ch_mult=[1, 2], num_res_blocks=2,
                     attn_resolutions=[8], dropout=0.0).eval()
    _perturb_(net, std=0.1)
    x, eta = torch.randn(4, 3, 16, 16), torch.tensor([-3.0, 0.0, 1.0, 4.0])
    ref = net(x, eta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = net(x, eta)
    rel = (low.float() - ref).norm() / ref.norm()
    assert rel < 5e-2, float(rel)
