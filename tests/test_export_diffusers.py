"""`st export --format diffusers`: the UNet2DModel diffusers loads computes st's score.

Each exportable family is an st net with random weights (every parameter perturbed, so the
zero-initialised output layers are not zero), saved as a checkpoint, exported by the real CLI,
loaded with diffusers' own ``UNet2DModel.from_pretrained`` and wrapped by the code that
docs/checkpoints.md shows; its score must equal st's at t = 1e-5, 1e-3, 0.3 and 1.  Every refused
feature has a case below that names it, and a refusal writes nothing.
"""

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, st
from diffusers import ScoreSdeVeScheduler, UNet2DModel

from stcli.components.nets import build_score_model
from stcli.components.recipe import load_recipe
from stcli.infra import checkpoint
from stcli.jobs.model_card import BIBTEX, WRAPPER

TIMES = (1e-5, 1e-3, 0.3, 1.0)
FAMILIES = {  # name -> (paper recipe, overrides): small widths, the recipe's block structure
    # the 256x256 layout (7 levels, output_skip / input_skip); without attention: diffusers
    # normalises attention in 32 groups, which st uses only from 128 channels on
    "uncsnpp_256": ("celebahq_uncsnpp_rve_nll_st", ["net.nf=8", "net.attn_resolutions=[]"]),
    # both pyramids and attention (AttnSkipDown/UpBlock2D) at 128 channels
    "uncsnpp_pyramids_attention": ("cifar10_uncsnpp_rve_nll_st", [
        "net.nf=64", "net.ch_mult=[1,2,2]", "net.num_res_blocks=2", "net.progressive=output_skip",
        "net.progressive_input=input_skip"]),
    # the CelebA 64x64 layout without an input pyramid; log sigma input, VE scheduler
    "ncsnpp_ve_64": ("celeba_ncsnpp_ve_var", ["net.nf=16", "net.attn_resolutions=[]",
                                              "net.progressive_input=none"]),
    # deep DDPM++ (8 blocks per level) with FIR resampling: positional, t999, VP scheduler
    "ddpmpp_deep_fir": ("cifar10_ddpmpp_deep_vp_var", ["net.nf=16", "net.attn_resolutions=[]",
                                                       "net.fir=true"]),
    # UDDPM++ with FIR resampling: int_g2_sigma2, a time input only the wrapper computes
    "uddpmpp_fir": ("celeba_uddpmpp_vp_nll", ["net.nf=16", "net.attn_resolutions=[]", "net.fir=true",
                                              "data.image_size=32", "net.num_res_blocks=1"]),
}


def recipe_of(name: str, overrides: list[str]):
    return load_recipe(ROOT / "recipes" / f"{name}.yaml", overrides)


def variant(family: str, *overrides: str):
    """The recipe of `family` with more overrides."""
    name, base = FAMILIES[family]
    return recipe_of(name, [*base, *overrides])


def make_checkpoint(path: Path, recipe, perturb: bool = True):
    """An st checkpoint of the recipe's net with random weights (EMA and raw differ); returns
    the EMA and raw score models."""
    gen = torch.Generator().manual_seed(0)
    models = []
    for _ in ("ema", "raw"):
        model = build_score_model(recipe.net, recipe.sde, recipe.data.shape, recipe.data.zero_centered)
        with torch.no_grad():
            for p in model.parameters() if perturb else ():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        models.append(model.eval())
    tensors = {f"{section}.{k}": v.clone() for section, model in zip(("ema", "model"), models)
               for k, v in model.state_dict().items()}
    checkpoint.save(path, tensors, {"recipe": recipe.to_dict(), "step": 1234})
    return models


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max over images of max |a - b| / max |b| (per image)."""
    return ((a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1)).max().item()


def inputs(recipe, n: int = 2) -> torch.Tensor:
    x = torch.randn(n, *recipe.data.shape, generator=torch.Generator().manual_seed(1))
    return x if recipe.data.zero_centered else (x + 1) / 2  # the data's range


def docs_wrapper() -> str:
    """The python block of docs/checkpoints.md that defines st_score."""
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return next(b for b in blocks if "def st_score" in b)


@pytest.fixture(scope="module")
def st_score():
    namespace = {}
    exec(docs_wrapper(), namespace)
    return namespace["st_score"]


def export(capsys, ckpt: Path, out: Path, *args) -> tuple[int, str, str]:
    return st(capsys, "export", ckpt, "--format", "diffusers", "--out", out, *args)


# --- every exportable family computes st's score -----------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_exported_unet_computes_sts_score(family, tmp_path, capsys, st_score):
    recipe = recipe_of(*FAMILIES[family])
    ema, _ = make_checkpoint(tmp_path / "ckpt.safetensors", recipe)
    code, _, err = export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "unet")
    assert code == 0, err
    score, x = st_score(tmp_path / "unet"), inputs(recipe)
    with torch.no_grad():  # t in float64 for both (t = 1e-5 rounded to float32 moves RVE's eta)
        errors = [rel_err(score(x, t), ema.score(x, torch.full((2,), t, dtype=torch.float64)))
                  for t in TIMES]
    print(family, ["%.1e" % e for e in errors])
    assert max(errors) <= 1e-4, errors
    info = json.loads((tmp_path / "unet" / "st_score.json").read_text())
    assert info["sde"] == recipe.sde.model_dump(mode="json")  # eps included


def test_a_wrong_pyramid_or_time_would_be_caught(tmp_path, capsys, st_score):
    """The comparison above can fail: zeroing the pyramid convolutions, or asking at another
    time, moves the score far beyond the tolerance."""
    recipe = recipe_of(*FAMILIES["uncsnpp_pyramids_attention"])
    ema, _ = make_checkpoint(tmp_path / "ckpt.safetensors", recipe)
    assert export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "unet")[0] == 0
    x, t = inputs(recipe), torch.full((2,), 0.3, dtype=torch.float64)
    with torch.no_grad():
        ref = ema.score(x, t)
        assert rel_err(st_score(tmp_path / "unet")(x, 0.31), ref) > 1e-3
        unet = UNet2DModel.from_pretrained(tmp_path / "unet")
        for name in ("down_blocks.0.skip_conv", "up_blocks.0.skip_conv"):
            unet.get_submodule(name).weight.zero_()
        unet.save_pretrained(tmp_path / "broken")
        (tmp_path / "broken" / "st_score.json").write_text((tmp_path / "unet" / "st_score.json").read_text())
        assert rel_err(st_score(tmp_path / "broken")(x, t), ref) > 1e-3


def test_raw_weights_and_diffusers_own_score_convention(tmp_path, capsys, st_score):
    """--weights raw exports the raw weights; a log-sigma NCSN++ also follows diffusers' own
    convention (ScoreSdeVePipeline's): unet(x, sigma).sample is the score."""
    recipe = recipe_of(*FAMILIES["ncsnpp_ve_64"])
    ema, raw = make_checkpoint(tmp_path / "ckpt.safetensors", recipe)
    assert export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "raw", "--weights", "raw")[0] == 0
    x, t = inputs(recipe), torch.full((2,), 0.3, dtype=torch.float64)
    unet = UNet2DModel.from_pretrained(tmp_path / "raw").eval()
    with torch.no_grad():
        ref = raw.score(x, t)
        assert rel_err(st_score(tmp_path / "raw")(x, t), ref) <= 1e-4
        assert rel_err(unet(x, recipe.sde.std(t)).sample, ref) <= 1e-4
        assert rel_err(ema.score(x, t), ref) > 1e-2  # (the two sets differ)
    assert json.loads((tmp_path / "raw" / "st_score.json").read_text())["native_score"] is True


# --- the scheduler configurations compute st's SDE ----------------------------------------------
def test_ve_scheduler_has_sts_sigmas(tmp_path, capsys):
    recipe = recipe_of("celeba_ncsnpp_ve_var", ["net.nf=16", "net.attn_resolutions=[]",
                                                 "net.progressive_input=none", "net.num_res_blocks=1"])
    make_checkpoint(tmp_path / "ckpt.safetensors", recipe, perturb=False)
    assert export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "unet")[0] == 0
    scheduler = ScoreSdeVeScheduler.from_pretrained(tmp_path / "unet")
    assert scheduler.config.sampling_eps == recipe.sde.eps and scheduler.config.snr == recipe.sample.snr
    scheduler.set_timesteps(50)
    scheduler.set_sigmas(50)
    ref = recipe.sde.std(scheduler.timesteps.double())
    assert torch.allclose(scheduler.sigmas.double(), ref, rtol=1e-5, atol=0)


def test_vp_scheduler_steps_with_sts_beta_and_sigma(tmp_path, capsys):
    """ScoreSdeVpScheduler's Euler-Maruyama step, fed the noise prediction eps, moves x by
    (f - g^2 s) dt with st's f, g^2 and s = -eps / sigma."""
    from diffusers.schedulers.deprecated.scheduling_sde_vp import ScoreSdeVpScheduler

    recipe = recipe_of(*FAMILIES["uddpmpp_fir"])
    make_checkpoint(tmp_path / "ckpt.safetensors", recipe, perturb=False)
    assert export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "unet")[0] == 0
    scheduler = ScoreSdeVpScheduler.from_pretrained(tmp_path / "unet")
    scheduler.set_timesteps(100)
    sde, x, eps = recipe.sde, torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    for t in (0.05, 0.3, 1.0):
        tt = torch.full((3,), t, dtype=torch.float64)
        _, x_mean = scheduler.step_pred(eps, x, tt)
        s = -eps / sde.std(tt)[:, None]
        ref = x + (sde.drift(x, tt) - sde.g2(tt)[:, None] * s) * (-1 / 100)
        assert torch.allclose(x_mean, ref, rtol=1e-9, atol=0), t


def test_subvp_rve_edm_get_no_scheduler_but_sts_description(tmp_path, capsys):
    for sde in ("subvp", "rve", "edm"):
        ckpt = tmp_path / f"{sde}.safetensors"
        make_checkpoint(ckpt, variant("uddpmpp_fir", f"sde={{name: {sde}}}"), perturb=False)
        assert export(capsys, ckpt, tmp_path / sde)[0] == 0
        assert not (tmp_path / sde / "scheduler_config.json").exists()
        assert json.loads((tmp_path / sde / "st_score.json").read_text())["sde"]["name"] == sde
        card = (tmp_path / sde / "README.md").read_text()
        assert f"no diffusers scheduler computes the {sde} SDE" in card


def test_the_sampler_travels_in_st_score_and_the_card_says_when_the_scheduler_differs(tmp_path, capsys):
    times = [1.0, 0.5, 0.1, 0.01, 1e-5]
    cases = {"plain": ("{name: euler_maruyama, steps: 4, schedule: uniform}", False),
             "edm_grid": ("{name: dpm2m, steps: 4, schedule: edm}", True),
             "tuned": (f"{{name: euler_maruyama, steps: 4, times: {times}}}", True)}
    for name, (sample, noted) in cases.items():
        ckpt = tmp_path / f"{name}.safetensors"
        make_checkpoint(ckpt, variant("uddpmpp_fir", f"sample={sample}"), perturb=False)
        assert export(capsys, ckpt, tmp_path / name)[0] == 0
        info = json.loads((tmp_path / name / "st_score.json").read_text())
        card = (tmp_path / name / "README.md").read_text()
        assert info["sample"]["steps"] == 4
        assert info["sample"].get("times") == (times if name == "tuned" else None)
        assert ("does not reproduce" in card) == noted, name
    assert "on 5 explicit times" in card


# --- the model card and the docs --------------------------------------------------------------
def test_model_card_and_docs_show_the_same_wrapper_and_the_papers_bibtex(tmp_path, capsys):
    recipe = recipe_of(*FAMILIES["uddpmpp_fir"])
    make_checkpoint(tmp_path / "ckpt.safetensors", recipe, perturb=False)
    assert export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "unet")[0] == 0
    card = (tmp_path / "unet" / "README.md").read_text()
    assert docs_wrapper() == WRAPPER and WRAPPER in card and BIBTEX in card
    for fact in ("`celeba_uddpmpp_vp_nll`", "1234 steps; ema weights", "ScoreSdeVpScheduler",
                 "| metrics | none", "time input int_g2_sigma2", "library_name: diffusers"):
        assert fact in card, fact
    # the BibTeX is CITATION.cff's Soft Truncation reference
    ref = next(r for r in yaml.safe_load((ROOT / "CITATION.cff").read_text())["references"]
               if r["title"].startswith("Soft Truncation"))
    authors = " and ".join(f"{a['family-names']}, {a['given-names']}" for a in ref["authors"])
    flat = re.sub(r"\s+", " ", BIBTEX)
    for field, value in (("title", ref["title"]), ("author", authors),
                         ("booktitle", ref["collection-title"]), ("year", str(ref["year"]))):
        assert f"{field} = {{{value}}}" in flat, field


# --- refusals: the feature named, exit code 2, nothing written -----------------------------------
REFUSED = {  # feature named -> (recipe, overrides)
    "progressive_input: residual": ("cifar10_ncsnpp_ve_var", ["net.nf=16"]),
    "fir: false": ("cifar10_ddpmpp_vp_var", ["net.nf=16"]),
    "preconditioning: edm": ("cifar10_ddpmpp_edm_stf", ["net.nf=16", "net.fir=true"]),
    "progressive: residual": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                        "net.progressive=residual"]),
    "progressive_combine: cat": ("cifar10_ncsnpp_ve_var", [
        "net.nf=16", "net.progressive_input=input_skip", "net.progressive_combine=cat"]),
    "resblock_type: ddpm": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                      "net.resblock_type=ddpm"]),
    "fir_kernel: [1.0, 1.0]": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                         "net.fir_kernel=[1, 1]"]),
    "skip_rescale: false": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                      "net.skip_rescale=false"]),
    "conditional: false": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                     "net.conditional=false"]),
    "ch_mult[0] = 2": ("cifar10_ncsnpp_ve_var", ["net.nf=8", "net.progressive_input=none",
                                                 "net.ch_mult=[2,2,2]"]),
    "1-channel images": ("cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none",
                                                   "data.name=folder", "data.channels=1"]),
    "time_input: t999 with embedding_type: fourier": ("cifar10_ncsnpp_ve_var", [
        "net.nf=16", "net.progressive_input=none", "net.time_input=t999"]),
    "net 'unet'": ("quickstart_digits", []),
    # diffusers normalises attention in 32 groups: st uses 16 for 64 channels ...
    "group-norm groups: diffusers' down_blocks.1.attention normalises 64 channels in 32 groups, st in 16":
        ("cifar10_ncsnpp_ve_var", ["net.nf=32", "net.progressive_input=none", "net.ch_mult=[1,2]",
                                   "net.num_res_blocks=1"]),
    # ... and cannot build it for 16 channels
    "group-norm groups: diffusers' skip blocks cannot be built": (
        "cifar10_ncsnpp_ve_var", ["net.nf=16", "net.progressive_input=none", "net.ch_mult=[1,2]",
                                  "net.attn_resolutions=[32]"]),
}


@pytest.mark.parametrize("feature", list(REFUSED))
def test_a_net_diffusers_cannot_compute_is_refused_naming_the_feature(feature, tmp_path, capsys):
    make_checkpoint(tmp_path / "ckpt.safetensors", recipe_of(*REFUSED[feature]), perturb=False)
    capsys.readouterr()  # what building the recipe said (a replaced data section, say)
    code, _, err = export(capsys, tmp_path / "ckpt.safetensors", tmp_path / "out")
    assert code == 2, err
    assert feature in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_bad_options_and_folders_are_refused_before_writing(tmp_path, capsys, monkeypatch):
    recipe = recipe_of(*FAMILIES["uddpmpp_fir"])
    ckpt = tmp_path / "ckpt.safetensors"
    make_checkpoint(ckpt, recipe, perturb=False)
    out = tmp_path / "out"
    code, _, err = st(capsys, "export", ckpt, "--format", "onnx", "--out", out)
    assert code == 2 and "Invalid value for '--format'" in err and not out.exists()
    code, _, err = export(capsys, ckpt, out, "--dtype", "fp16")
    assert code == 2 and "a diffusers export is float32" in err and not out.exists()
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    code, _, err = export(capsys, ckpt, out)
    assert code == 2 and "needs the diffusers package" in err and not out.exists()
    code, _, err = st(capsys, "export", ckpt, "--out", tmp_path / "st.safetensors")  # --format st
    assert code == 0, err
    monkeypatch.undo()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = export(capsys, ckpt, out)
    assert code == 2 and "is not empty" in err and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert export(capsys, ckpt, out, "--overwrite")[0] == 0
    assert (out / "scheduler_config.json").exists() and (out / "notes.txt").read_text() == "mine"
    subvp = tmp_path / "subvp.safetensors"  # an export without a scheduler replaces the one before
    make_checkpoint(subvp, variant("uddpmpp_fir", "sde={name: subvp}"), perturb=False)
    assert export(capsys, subvp, out, "--overwrite")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "diffusion_pytorch_model.safetensors", "notes.txt", "st_score.json"]
