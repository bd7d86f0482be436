"""`st recipe show --cost`: FLOPs against a count by hand, memory against a measured CPU peak,
the samplers' NFE, the GPU table, and the command line."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, st

from stcli.components.nets import build_score_model
from stcli.components.recipe import load_recipe
from stcli.infra.distributed import Context
from stcli.jobs import cost

UNET = {"name": "unet", "nf": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
        "dropout": 0.1}
# NCSN++ with FIR resampling (depthwise convolutions), input and output pyramids and attention
NCSNPP = {"name": "ncsnpp", "nf": 8, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [8],
          "progressive": "output_skip"}


def small_recipe(tiny_recipe, net: dict, batch: int = 8):
    """The tiny recipe on 16x16 digits with `net` (VE for NCSN++'s log-sigma time input)."""
    sde = {"name": "ve"} if net["name"] == "ncsnpp" else {"name": "vp"}
    return load_recipe(tiny_recipe(f"{net['name']}{batch}", net=net, sde=sde,
                                   data={"image_size": 16}, train={"batch_size": batch}))


class HandCount:
    """FLOPs from the shapes of every convolution, linear layer and attention a forward pass
    calls (torch.nn.functional patched), 2 per multiply-accumulate, and those of its backward:
    one more product per operand that needs a gradient (the input, the weight); attention's
    backward is twice its forward (dS and dV from its product with v, dQ and dK from q k^T;
    st's q, k and v come from one convolution, so they need gradients together)."""

    def __init__(self, monkeypatch):
        self.forward = self.backward = 0
        for name, flops in (("conv2d", self.conv), ("conv_transpose2d", self.conv_transpose),
                            ("linear", self.linear), ("scaled_dot_product_attention", self.attention)):
            monkeypatch.setattr(F, name, self.counting(getattr(F, name), flops))

    def counting(self, op, flops):
        def counted(*args, **kwargs):
            out = op(*args, **kwargs)
            forward, operands = flops(out, *args[:3])
            self.forward += forward
            self.backward += forward * sum(o.requires_grad for o in operands)
            return out
        return counted

    @staticmethod
    def conv(out, x, w, *_):  # 2 Cin/groups Cout k k Hout Wout per image
        return 2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3], (x, w)

    @staticmethod
    def conv_transpose(out, x, w, *_):  # each input pixel meets Cout/groups k k weights
        return 2 * x.numel() * w.shape[1] * w.shape[2] * w.shape[3], (x, w)

    @staticmethod
    def linear(out, x, w, *_):  # 2 in out per row
        return 2 * x.numel() * w.shape[0], (x, w)

    @staticmethod
    def attention(out, q, k, v):  # q k^T, then its product with v, for every query row
        rows = q.numel() // q.shape[-1]
        return 2 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1]), (q, v)  # backward: 2 x


def hand_count(monkeypatch, net, shape, batch: int, grad: bool) -> HandCount:
    """The hand count of one call of the real `net` on `batch` random inputs."""
    with monkeypatch.context() as patch, torch.set_grad_enabled(grad):
        hand = HandCount(patch)
        net(torch.randn(batch, *shape), torch.rand(batch))
    return hand


@pytest.mark.parametrize("net", [UNET, NCSNPP], ids=["unet", "ncsnpp"])
def test_flops_are_the_hand_count(tiny_recipe, monkeypatch, net):
    """Forward at batch 1 and 4 and forward + backward at 4, counted on the meta device, are
    within 5% of the hand count on the real net; neither counts elementwise work."""
    recipe = small_recipe(tiny_recipe, net)
    data = recipe.data.resolved()
    real = build_score_model(recipe.net, recipe.sde, data.shape, data.zero_centered).train()
    meta = cost.meta_model(recipe)
    for batch in (1, 4):
        hand = hand_count(monkeypatch, real, data.shape, batch, grad=False)
        assert cost.forward_flops(meta, recipe, batch) == pytest.approx(hand.forward, rel=0.05)
    hand = hand_count(monkeypatch, real, data.shape, 4, grad=True)
    flops, _ = cost.training_pass(meta, recipe, 4)
    assert flops == pytest.approx(hand.forward + hand.backward, rel=0.05)
    assert hand.backward > 1.8 * hand.forward  # the backward's weight and input gradients


def live_bytes(tensors) -> int:
    """Bytes of the distinct storages of `tensors`."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def measured_peak(trainer, batch: torch.Tensor) -> int:
    """Peak bytes of live CPU tensors during one training step of `trainer` (after a first step
    has created Adam's state): the bytes live before it (model, EMA and optimizer state, read
    from the tensors) plus the highest running sum of the allocations and frees torch's
    profiler records (profile_memory) during the step: forward, backward, clipping, Adam, EMA."""
    trainer._good_step(batch, None)
    trainer.update_ema()
    state = [*trainer.model.state_dict().values(), *trainer.ema.state_dict().values(),
             *(v for s in trainer.optimizer.state.values() for v in s.values())]
    profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                     profile_memory=True)
    with profile:
        trainer._good_step(batch, None)
        trainer.update_ema()
    events = sorted((e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    running = peak = 0
    for event in events:
        running += event.nbytes()
        peak = max(peak, running)
    return live_bytes(state) + peak


@pytest.mark.parametrize("batch", [8, 32])
def test_memory_is_the_measured_peak_of_a_cpu_step(tiny_recipe, batch):
    """weights + EMA + gradients + Adam + saved activations, from the meta device, is within
    20% of the peak of live tensor bytes of a real fp32 training step on the CPU."""
    from stcli.jobs.train import Trainer

    recipe = small_recipe(tiny_recipe, UNET, batch)
    trainer = Trainer(recipe, Context(0, 1, torch.device("cpu")))
    measured = measured_peak(trainer, trainer.dataset.data[:batch])
    estimate = cost.count(recipe).memory
    assert estimate.total == pytest.approx(measured, rel=0.2)
    assert estimate.activations > estimate.total / 2  # the part measured on meta dominates


def test_meta_autocast_saves_what_autocast_saves():
    """bf16 on the meta device saves the bytes CPU autocast saves for convolutions and linear
    layers (both put them in bf16 and keep the float32 input of what follows in float32)."""
    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 6 * 6, 5))

    real = net()
    with cost.saving(real) as saved, torch.autocast("cpu", dtype=torch.bfloat16):
        real(torch.randn(4, 3, 8, 8, requires_grad=True)).float().sum()
    with torch.device("meta"):
        meta = net()
    with cost.saving(meta) as emulated, cost.MetaAutocast(torch.bfloat16):
        meta(torch.empty(4, 3, 8, 8, device="meta", requires_grad=True)).float().sum()
    assert sum(emulated.values()) == sum(saved.values())
    with cost.saving(meta) as full:
        meta(torch.empty(4, 3, 8, 8, device="meta", requires_grad=True)).sum()
    assert sum(full.values()) > sum(saved.values())


@pytest.mark.parametrize("sample, nfe", [
    ({"name": "pc", "steps": 10}, 21),  # steps (1 + n_corrector) + 1 (denoise)
    ({"name": "pc", "steps": 10, "corrector": "none", "denoise": False}, 10),
    ({"name": "pc", "steps": 10, "n_corrector": 2}, 31),
    ({"name": "euler_maruyama", "steps": 7}, 8),
    ({"name": "heun", "steps": 5}, 11),  # 2 steps + 1
    ({"name": "dpm2m", "steps": 6, "denoise": False}, 6),
    ({"name": "ode"}, None),  # adaptive
])
def test_sampler_nfe_is_the_documented_count(tiny_recipe, sample, nfe):
    from stcli.infra.registry import SAMPLERS

    recipe = load_recipe(tiny_recipe("nfe"))
    recipe = recipe.model_copy(update={"sample": SAMPLERS.validate(**sample)})
    assert cost.sampler_nfe(recipe) == nfe


@pytest.mark.parametrize("steps", [11, 40])
def test_grid_nfe_from_the_line_is_the_count_of_the_whole_run(steps):
    """GridSampler.nfe counts 8, 9 and 10 steps and extends the line: for every registered grid
    sampler (unipc at each order, pc with two corrector steps) it equals the run's own count."""
    from stcli.components.samplers.base import GridSampler
    from stcli.components.sdes import VP
    from stcli.infra.registry import SAMPLERS

    specs = [SAMPLERS.validate(name=n, steps=steps) for n in SAMPLERS.names()
             if isinstance(SAMPLERS.validate(name=n), GridSampler)]
    specs += [SAMPLERS.validate(name="unipc", steps=steps, order=k) for k in (1, 2)]
    specs += [SAMPLERS.validate(name="pc", steps=steps, n_corrector=2, denoise=False)]
    times = [1.0 - (1.0 - 1e-5) * i / steps for i in range(steps + 1)]  # explicit times: counted on copies
    specs += [SAMPLERS.validate(name=n, times=times) for n in ("heun", "unipc")]
    assert len({s.name for s in specs}) >= 5
    sde = VP()
    for spec in specs:
        _, run = spec(lambda x, t: -x, sde, torch.zeros(1, 1), generator=torch.Generator().manual_seed(0))
        assert spec.nfe(sde) == run, spec


def test_a_grid_beyond_a_million_steps_is_refused(tiny_recipe, capsys):
    code, _, err = st(capsys, "recipe", "validate", tiny_recipe(), "sample.steps=1000000000")
    assert code == 2 and "1,000,000,000 steps: a grid sampler takes at most 1,000,000" in err
    assert "Traceback" not in err
    assert st(capsys, "recipe", "validate", tiny_recipe(), "sample.steps=1000000")[0] == 0
    assert st(capsys, "recipe", "validate", tiny_recipe(), "sample.steps=1000001")[0] == 2


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("A100", "fp32", True, ("TF32", 156)), ("A100", "fp32", False, ("FP32", 19.5)),
    ("a100", "bf16", True, ("BF16", 312)), ("H100", "fp16", True, ("FP16", 989.5)),
    ("V100", "fp32", True, ("FP32", 15.7)), ("V100", "bf16", True, ("FP32", 15.7)),
    ("V100", "fp16", True, ("FP16", 125)), ("L40S", "fp32", True, ("TF32", 183)),
])
def test_peak_follows_the_recipes_precision(name, precision, tf32, peak):
    assert cost.peak(cost.gpu(name), precision, tf32) == peak


def test_timing_scales_the_flops_and_checks_the_memory(tiny_recipe):
    recipe = load_recipe(tiny_recipe("time", train={"steps": 1000}))
    counted = cost.count(recipe)
    on_a100 = cost.timing(counted, cost.gpu("A100-40GB"))
    rate = 156e12 * cost.UTILISATION  # TF32: fp32 recipes train with tf32 by default
    assert on_a100.step_s == pytest.approx(counted.step_flops / rate)
    assert on_a100.run_s == pytest.approx(1000 * on_a100.step_s)
    per_image = counted.eval_flops_1 * counted.nfe  # the tiny recipe's sampler: 6 NFE
    assert counted.fid_samples == recipe.eval.fid.n
    assert on_a100.fid_s == pytest.approx(recipe.eval.fid.n * per_image / rate, rel=1e-6)
    few = cost.count(load_recipe(tiny_recipe("time_few", train={"steps": 1000}, eval={"fid": {"n": 1000}})))
    assert few.fid_samples == 1000  # the recipe's eval.fid.n, not a fixed 50,000
    assert cost.timing(few, cost.gpu("A100-40GB")).fid_s == pytest.approx(1000 * per_image / rate, rel=1e-6)
    assert on_a100.fits
    huge = replace(counted, memory=cost.Memory(0, 0, 0, 0, activations=41 * 10**9))
    assert not cost.timing(huge, cost.gpu("A100-40GB")).fits


def test_cli_prints_the_cost_and_refuses_an_unknown_gpu(capsys):
    from stcli.jobs.resources import parameter_count

    path = ROOT / "recipes" / "quickstart_digits.yaml"
    code, out, err = st(capsys, "recipe", "show", path, "--cost", "--gpu", "h100")
    assert code == 0, err
    assert "# parameters (trainable)" in out and f"{parameter_count(load_recipe(path)):,}" in out
    for row in ("FLOPs: training step, 1 x batch 64", "activations, batch 64", "H100: run of 1,000 steps",
                "H100: FID of 50,000 samples (eval.fid.n)", "multiply-accumulate", "CUDA context"):
        assert row in out
    code, out, err = st(capsys, "recipe", "show", path, "--cost")
    assert code == 0 and "memory: total" in out and "H100" not in out
    code, out, err = st(capsys, "recipe", "show", path, "--gpu", "T4")
    assert code == 2 and out == "" and "unknown GPU 'T4'" in err
    assert all(gpu.name in err for gpu in cost.GPUS.values())
