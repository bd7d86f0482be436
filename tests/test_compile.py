"""`train.compile` cannot rot unseen: the score models trace into one graph under torch.compile
(no graph break) and the compiled model gives the eager scores.

Inductor's code generation takes minutes on a CPU, so this test compiles with the
``aot_eager`` backend: TorchDynamo's capture and AOTAutograd's forward and backward graphs, which
is where st's code could break compilation; benchmarks/gpu_check.sh runs the inductor path on a
GPU."""

import pytest
import torch
from conftest import TINY

from stcli.components.nets import build_score_model
from stcli.components.recipe import parse_recipe

NETS = {
    "unet": TINY,
    "ncsnpp": {**TINY, "data": {**TINY["data"], "image_size": 16}, "sde": {"name": "ve"},
               "net": {"name": "ncsnpp", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1,
                       "attn_resolutions": [8], "dropout": 0.0}},
}  # (DDPM++ is NCSN++'s code with other options; each net costs 10-20 s of tracing)


@pytest.mark.parametrize("name", list(NETS))
def test_compiled_net_gives_the_eager_scores_and_gradients(name):
    recipe = parse_recipe(NETS[name])
    torch.manual_seed(0)
    model = build_score_model(recipe.net, recipe.sde, recipe.data.shape, recipe.data.zero_centered)
    with torch.no_grad():
        for p in model.parameters():  # the output layers start at zero: make every path count
            p.normal_(0.0, 0.05)
    model.eval()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, *recipe.data.shape)
    t = torch.tensor([1e-5, 1e-3, 0.3, 1.0])
    eager, out = model(x, t), compiled(x, t)
    assert eager.abs().max() > 0.01
    assert (out - eager).abs().max() <= 1e-5 * eager.abs().max()
    grad_eager = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    grad = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    for a, b in zip(grad, grad_eager):
        assert (a - b).abs().max() <= 1e-5 * (b.abs().max() + 1e-12)
