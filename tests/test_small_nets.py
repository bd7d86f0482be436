"""The small backbones (unet, mlp) and their shared layers."""

from __future__ import annotations

import math

import pytest
import torch

from stcli.components.nets import small  # noqa: F401  (registers unet, mlp)
from stcli.components.nets.layers import (
    AttnBlock,
    GaussianFourierEmbedding,
    ResBlock,
    TimeEmbedding,
    groups_for,
    sinusoidal_embedding,
)
from stcli.infra.errors import UserError
from stcli.infra.registry import NETS


def _perturb_(net: torch.nn.Module, std: float = 0.05) -> None:
    """Add noise to every parameter, so zero-initialised layers no longer block gradients."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(std * torch.randn_like(p))


def _eta(b: int) -> torch.Tensor:
    return torch.linspace(0.0, 999.0, b)


@pytest.mark.parametrize(
    "shape, params",
    [
        ((1, 16, 16), {"nf": 16}),
        ((3, 32, 32), {"nf": 16, "attn_resolutions": [16]}),
        ((3, 8, 8), {"nf": 16, "ch_mult": [1, 2]}),
    ],
)
def test_unet_shape_zero_start_and_gradients_reach_every_parameter(shape, params):
    torch.manual_seed(0)
    net = NETS.build("unet", shape=shape, **params)
    x = torch.randn(3, *shape)
    out = net(x, _eta(3))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv
    _perturb_(net)
    out = net(x, _eta(3))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.pow(2).sum().backward()
    names = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []


def test_unet_output_depends_on_eta_and_accepts_float64_eta():
    torch.manual_seed(0)
    net = NETS.build("unet", nf=16, shape=(1, 8, 8), embedding="fourier")
    _perturb_(net)
    x = torch.randn(2, 1, 8, 8)
    a, b = net(x, torch.tensor([-3.0, -3.0])), net(x, torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert a.dtype == b.dtype == torch.float32
    assert not torch.allclose(a, b)


def test_unet_attention_layers_are_where_asked():
    net = NETS.build("unet", nf=16, shape=(3, 32, 32), attn_resolutions=[16])
    n_attn = sum(isinstance(m, AttnBlock) for m in net.modules())
    assert n_attn == 1 + 2 + 1  # one down block, two up blocks at 16x16, one in the middle


def test_builds_are_deterministic_under_a_seed():
    def params(seed):
        torch.manual_seed(seed)
        return NETS.build("unet", nf=16, shape=(1, 16, 16)).state_dict()

    a, b, c = params(1), params(1), params(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv_in.weight"], c["conv_in.weight"])


def test_fourier_frequencies_do_not_depend_on_the_global_seed():
    torch.manual_seed(1)
    w1 = NETS.build("mlp", shape=(2,), embedding="fourier").temb.fourier.W
    torch.manual_seed(2)
    w2 = NETS.build("mlp", shape=(2,), embedding="fourier").temb.fourier.W
    assert torch.equal(w1, w2)
    assert w1.shape == (64,)
    assert 8.0 < w1.std().item() < 24.0  # drawn with scale 16


def test_sinusoidal_embedding_matches_the_formula():
    eta, dim, max_pos = torch.tensor([0.0, 1.5, 999.0, -7.25], dtype=torch.float64), 10, 10000
    emb = sinusoidal_embedding(eta, dim, max_pos)
    half = dim // 2
    for i, e in enumerate(eta.tolist()):
        for k in range(half):
            f = math.exp(-math.log(max_pos) * k / (half - 1))
            assert emb[i, k].item() == pytest.approx(math.sin(e * f), abs=1e-9)
            assert emb[i, half + k].item() == pytest.approx(math.cos(e * f), abs=1e-9)
    odd = sinusoidal_embedding(eta, dim + 1, max_pos)
    assert torch.equal(odd[:, :dim], emb)
    assert torch.equal(odd[:, dim], torch.zeros(4, dtype=eta.dtype))


def test_gaussian_fourier_embedding_matches_the_formula():
    layer = GaussianFourierEmbedding(8, scale=3.0)
    eta = torch.tensor([-12.0, 0.0, 0.3, 5.0], dtype=torch.float64)
    emb = layer(eta)
    assert emb.shape == (4, 8)
    w = layer.W.double().tolist()
    for i, e in enumerate(eta.tolist()):
        for k, wk in enumerate(w):
            assert emb[i, k].item() == pytest.approx(math.sin(2 * math.pi * e * wk), abs=1e-9)
            assert emb[i, 4 + k].item() == pytest.approx(math.cos(2 * math.pi * e * wk), abs=1e-9)
    torch.manual_seed(5)
    assert torch.equal(GaussianFourierEmbedding(8, scale=3.0).W, layer.W)
    assert torch.allclose(GaussianFourierEmbedding(8, scale=6.0).W, 2 * layer.W)


def test_time_embedding_output_width():
    for kind in ("fourier", "positional"):
        out = TimeEmbedding(12, kind)(torch.tensor([0.0, 500.0]))
        assert out.shape == (2, 48) and out.dtype == torch.float32


def test_attention_block_equals_naive_attention():
    torch.manual_seed(0)
    block = AttnBlock(8)
    _perturb_(block, 0.3)
    x = torch.randn(2, 8, 4, 5)
    b, c, h, w = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(b, 3, c, h * w).unbind(1)  # (B, C, N) each
    weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)
    naive = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)
    expected = x + block.proj(naive)
    assert torch.allclose(block(x), expected, atol=1e-5)
    assert not torch.allclose(block(x), x, atol=1e-3)  # the attention branch does contribute


def test_resblock_starts_as_its_skip_path():
    torch.manual_seed(0)
    same, wider = ResBlock(8, 8, temb_dim=4), ResBlock(8, 16, temb_dim=4, skip_rescale=False)
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 4)
    assert torch.allclose(same(x, temb), x / math.sqrt(2))
    assert torch.allclose(wider(x, temb), wider.skip(x))


def test_groups_divide_channels():
    for ch in (1, 3, 8, 16, 24, 48, 64, 96, 128, 256, 320):
        g = groups_for(ch)
        assert ch % g == 0 and 1 <= g <= 32
    assert (groups_for(16), groups_for(64), groups_for(128), groups_for(256)) == (4, 16, 32, 32)


def test_unet_rejects_sizes_it_cannot_halve():
    with pytest.raises(UserError, match="divisible by 4"):
        NETS.build("unet", shape=(1, 10, 10))
    with pytest.raises(UserError, match="attn_resolutions"):
        NETS.build("unet", attn_resolutions=[7], shape=(1, 16, 16))
    with pytest.raises(UserError, match=r"\(C, H, W\)"):
        NETS.build("unet", shape=(2,))


def test_unknown_or_bad_fields_are_user_errors():
    with pytest.raises(UserError, match="bogus: unknown field"):
        NETS.validate("unet", bogus=1)
    with pytest.raises(UserError, match="ch_mult"):
        NETS.validate("unet", ch_mult=[])
    with pytest.raises(UserError, match="time_input"):
        NETS.validate("mlp", time_input="sigma")
    assert NETS.validate("unet").time_input == "t999"
    assert NETS.validate("mlp").time_input == "t999"


def test_mlp_shapes_gradients_and_bad_shapes():
    torch.manual_seed(0)
    net = NETS.build("mlp", hidden=32, layers=2, shape=(2,))
    x = torch.randn(5, 2)
    out = net(x, torch.linspace(-12.0, 5.0, 5))
    assert out.shape == (5, 2) and torch.count_nonzero(out) == 0
    _perturb_(net)
    net(x, torch.linspace(-12.0, 5.0, 5)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for shape in [(1, 8, 8), (3, 4)]:
        with pytest.raises(UserError, match=r"shape \(D,\)"):
            NETS.build("mlp", shape=shape)


def test_attention_gradients_keep_the_weights_layout():
    """DDP checks that each gradient has its parameter's strides ("grad strides do not match
    bucket view strides" otherwise): the attention output reaches proj in x's layout."""
    from stcli.components.nets.layers import AttnBlock

    block = AttnBlock(16)
    torch.nn.init.normal_(block.proj.weight)
    block(torch.randn(2, 16, 4, 4)).square().sum().backward()
    for p in block.parameters():
        assert p.grad.stride() == p.stride(), p.shape
