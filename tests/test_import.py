"""`st import` / `st export` / the Python API: score_sde checkpoints give score_sde's scores.

The references are two checkpoints written by score_sde's own code (tests/fixtures/score_sde) with
the scores its ``get_score_fn`` returned for them; the converted st model must reproduce them.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, run_st, st
from PIL import Image
from safetensors.torch import load_file

from stcli.components.loading import load_model
from stcli.components.recipe import load_recipe
from stcli.infra import checkpoint
from stcli.infra.errors import UserError
from stcli.jobs import importer

FIX = ROOT / "tests" / "fixtures" / "score_sde"
CASES = {  # fixture -> (recipe, overrides)
    "vp_ddpmpp": ("recipes/cifar10_ddpmpp_vp_var.yaml", ["net.nf=16"]),
    "ve_ncsnpp": ("recipes/cifar10_ncsnpp_ve_var.yaml", ["net.nf=16"]),
}


def pth(name: str) -> Path:
    return FIX / f"score_sde_{name}_nf16.pth"


def official_sigma_f32(name: str, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) as score_sde computes it, in float32 (``sde.marginal_prob``)."""
    t = t.float()
    if name.startswith("vp"):  # sqrt(1 - exp(2 log mean)): cancels badly for small t
        log_mean = -0.25 * t**2 * (20.0 - 0.1) - 0.5 * t * 0.1
        return torch.sqrt(1.0 - torch.exp(2.0 * log_mean))
    return 0.01 * (50.0 / 0.01) ** t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()




@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """Both fixtures converted by a real `st import` call."""
    root, out = tmp_path_factory.mktemp("imported"), {}
    for name, (recipe, overrides) in CASES.items():
        out[name] = root / f"{name}.safetensors"
        res = run_st("import", pth(name), "--recipe", ROOT / recipe, *overrides, "--out", out[name])
        assert res.returncode == 0, res.stderr
        assert "step 123456" in res.stdout
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_imported_ema_model_gives_the_official_scores(imported, name):
    io = load_file(FIX / f"score_sde_{name}_nf16_public_io.safetensors")
    model = load_model(imported[name]).model
    x, t, ref = io["x"], io["t"], io["score"]
    with torch.no_grad():
        score = model.score(x, t)
        # score_sde divides by its float32 sigma(t); st's sigma(t) is accurate (for VP at
        # t = 1e-5 the float32 one is 0.6 % off), so compare at the official sigma ...
        same_sigma = score * model.sde.std(t).view(-1, 1, 1, 1) / official_sigma_f32(name, t).view(
            -1, 1, 1, 1)
    assert rel_err(same_sigma, ref) <= 1e-4
    big = t >= 0.3  # ... and directly where float32 sigma has no cancellation
    assert rel_err(score[big], ref[big]) <= 1e-4
    assert rel_err(score, ref) <= (1e-4 if name.startswith("ve") else 1e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_raw_and_ema_weights_are_the_files_tensors(imported, name):
    raw_file = torch.load(pth(name), weights_only=True)
    official = {k.removeprefix("module."): v for k, v in raw_file["model"].items()}
    tensors, meta = checkpoint.load(imported[name])
    raw, ema = checkpoint.section("model", tensors), checkpoint.section("ema", tensors)
    assert meta["step"] == 123456 and not any(k.startswith("optim") for k in tensors)
    recipe = load_recipe(ROOT / CASES[name][0], CASES[name][1])
    rows = importer.mapping(recipe)
    used = [n for row in rows for n in row.official]
    assert len(used) == len(set(used)) and set(official) - set(used) == {"sigmas"}
    assert set(raw) == set(ema) == {row.st for row in rows}
    fourier = {n for row in rows if row.st.endswith("fourier.W") for n in row.official}
    trainable = [k for k in official if k != "sigmas" and k not in fourier]  # the file's order
    shadow = dict(zip(trainable, raw_file["ema"]["shadow_params"]))
    for row in rows:
        for source, tensors_by_name in ((raw, official), (ema, {**official, **shadow})):
            parts = [tensors_by_name[n] for n in row.official]
            st = source[row.st]
            if row.kind == "copy":
                assert torch.equal(st, parts[0]), row
            elif row.kind == "nin":  # NIN: y = x W, W (in, out); a 1x1 conv weight is (out, in)
                assert torch.equal(st[:, :, 0, 0], parts[0].t()), row
            elif row.kind == "qkv":
                chunks = st.chunk(3)
                for chunk, part in zip(chunks, parts):
                    assert torch.equal(chunk[:, :, 0, 0] if chunk.dim() == 4 else chunk,
                                       part.t() if part.dim() == 2 else part), row
            else:
                raise AssertionError(f"unexpected row kind in a released config: {row}")
        fixed = row.st.endswith("fourier.W")
        assert torch.equal(raw[row.st], ema[row.st]) == fixed, row  # every trainable one differs


def test_fir_upsampling_conv_is_score_sdes_fused_op():
    """An up-sampling conv weight w (out, in, 3, 3), imported, computes score_sde's
    ``upsample_conv_2d``: a stride-2 transposed conv with w flipped and transposed, then the
    FIR filter 4k with padding ((p + 1)//2 + 1, p//2 + 1), p = L - 4."""
    from stcli.components.nets.fir import FIRUpConv, fir_kernel

    torch.manual_seed(0)
    for taps in ([1, 3, 3, 1], [1, 1], [1, 2, 3, 3, 2, 1]):
        n = len(taps)
        w, b, x = torch.randn(5, 3, 3, 3), torch.randn(5), torch.randn(2, 3, 8, 8)
        row = importer.Row("conv.weight", ("Conv2d_0.weight",), "conv_t")
        layer = FIRUpConv(3, 5, taps)
        layer.conv.weight.data, layer.bias.data = row.convert([w]), b
        z = F.conv_transpose2d(x, w.flip(2, 3).permute(1, 0, 2, 3), stride=2)
        p = n - 4
        lo, hi = (p + 1) // 2 + 1, p // 2 + 1
        k = fir_kernel(taps) * 4
        ref = F.conv2d(F.pad(z, (lo, hi, lo, hi)), k.flip(0, 1).expand(5, 1, n, n), groups=5)
        assert torch.allclose(layer(x), ref + b.view(1, -1, 1, 1), atol=1e-5)
        assert torch.equal(row.invert(row.convert([w]))[0], w)


FAMILIES = {  # the released families' net options (score_sde / Soft Truncation configs)
    "ncsnpp_cifar": (32, dict(name="ncsnpp")),
    "ncsnpp_deep": (32, dict(name="ncsnpp", num_res_blocks=8)),
    "uncsnpp": (32, dict(name="ncsnpp", time_input="unbounded")),
    "ncsnpp_celeba64": (64, dict(name="ncsnpp", embedding_type="positional", time_input="t999")),
    "ncsnpp_256": (256, dict(name="ncsnpp", ch_mult=[1, 1, 2, 2, 2, 2, 2], num_res_blocks=2,
                             progressive="output_skip", progressive_input="input_skip",
                             nf=16)),
    "ddpmpp": (32, dict(name="ddpmpp")),
    "ddpmpp_deep": (32, dict(name="ddpmpp", num_res_blocks=8)),
    "uddpmpp": (32, dict(name="ddpmpp", time_input="int_g2_sigma2")),
    "ddpm_blocks_residual_cat": (32, dict(name="ncsnpp", resblock_type="ddpm", nf=16,
                                          progressive="residual", progressive_input="input_skip",
                                          progressive_combine="cat", attn_resolutions=[16, 8])),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_official_module_maps_once(family, tmp_path):
    side, net = FAMILIES[family]
    net = {**net, "nf": 16}  # the module structure does not depend on the width
    recipe = load_recipe(ROOT / "recipes/cifar10_ncsnpp_ve_var.yaml",
                         ["data.name=folder", f"data.image_size={side}", f"net={net}"])
    rows, shapes = importer.plan(recipe)
    assert sorted(r.st for r in rows) == sorted(shapes)  # every st tensor, once
    names = [n for r in rows for n in r.official]
    assert len(names) == len(set(names))
    indices = sorted({int(n.split(".")[1]) for n in names})
    modules = list(importer.official_modules(recipe.net, *recipe.data.shape[:2]))
    empty = {i for i, (kind, path) in enumerate(modules) if kind == "resample"
             and not any(r.st.startswith(f"backbone.{path}.") for r in rows)}
    assert sorted(set(indices) | empty) == list(range(len(modules)))
    # round trip: an st model written in the official layout imports to itself
    state = importer._build(recipe).state_dict()
    official = {}
    for row in rows:
        official.update(zip(row.official, row.invert(state[row.st])))
    fixed = {n for r in rows if r.st.endswith("fourier.W") for n in r.official}
    trainable = [n for n in official if n not in fixed]
    raw, ema = importer.convert(importer.Official(official, [official[n] for n in trainable], 7),
                                recipe)
    assert all(torch.equal(raw[k], v) and torch.equal(ema[k], v) for k, v in state.items())


def _write_pth(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, list[str], str]]:
    state = torch.load(pth("ve_ncsnpp"), weights_only=True)
    missing = {**state, "model": {k: v for k, v in state["model"].items()
                                  if k != "module.all_modules.5.Conv_0.weight"}}
    extra = {**state, "model": {**state["model"], "module.all_modules.99.weight": torch.zeros(3)}}
    marker = tmp_path / "code-ran"
    evil = {**state, "hook": _Evil(marker)}
    ve = CASES["ve_ncsnpp"]
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    return {
        "not score_sde": (_write_pth(tmp_path / "a.pth", {"weights": torch.zeros(2)}), ve[1],
                          "is not a score_sde checkpoint"),
        "shapes": (pth("ve_ncsnpp"), [],
                   r"module\.all_modules\.0\.W has shape \[16\], but st's "
                   r"backbone\.embed\.fourier\.W needs \[128\]"),
        "missing": (_write_pth(tmp_path / "m.pth", missing), ve[1],
                    r"st's backbone\.down\.0\.blocks\.1\.conv1\.weight comes from "
                    r"module\.all_modules\.5\.Conv_0\.weight, which the file lacks"),
        "extra": (_write_pth(tmp_path / "e.pth", extra), ve[1],
                  r"holds the tensor module\.all_modules\.99\.weight"),
        "pickled code": (_write_pth(tmp_path / "p.pth", evil), ve[1],
                         "cannot be loaded without running pickled code"),
        "not torch": (text, ve[1], "is not a readable PyTorch checkpoint"),
        # text the legacy reader fails on with KeyError / IndexError (it raised a traceback)
        **{f"junk {i}": (_write_text(tmp_path / f"junk{i}.pth", junk), ve[1],
                         r"is not a readable PyTorch checkpoint \((KeyError|IndexError)")
           for i, junk in enumerate(("junk data 12345", "every line here is text"))},
    }


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class _Evil:
    """Unpickling this would create ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bad_checkpoints_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    recipe = ROOT / CASES["ve_ncsnpp"][0]
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    for case, (src, overrides, message) in _bad_inputs(tmp_path).items():
        args = ("import", src, "--recipe", recipe, *overrides, "--out", out)
        if case == "pickled code":  # in a real process: no traceback, and the code never runs
            res = run_st(*args)
            code, err = res.returncode, res.stderr
        else:
            code, _, err = st(capsys, *args)
        assert code == 2, (case, err)
        assert re.search(message, err), (case, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, case
        assert list(out.parent.iterdir()) == [], case  # no output, no temporary file
    assert not (tmp_path / "code-ran").exists()


def test_export_keeps_the_function_at_a_fraction_of_the_size(imported, tmp_path, capsys):
    io = load_file(FIX / "score_sde_ve_ncsnpp_nf16_public_io.safetensors")
    src = imported["ve_ncsnpp"]
    with torch.no_grad():
        ref = load_model(src).model.score(io["x"], io["t"])
        ref_raw = load_model(src, "raw").model.score(io["x"], io["t"])
        rounded = load_model(src).model  # fp16 exports: exactly the function of rounded weights
        for p in rounded.parameters():
            p.copy_(p.half().float())
        ref16 = rounded.score(io["x"], io["t"])
        assert rel_err(ref16, ref) > 1e-4  # (the rounding matters: the check below can fail)
        for weights, dtype, tol, reference in (("ema", "fp32", 0.0, ref), ("raw", "fp32", 0.0, ref_raw),
                                               ("ema", "fp16", 1e-6, ref16)):
            out = tmp_path / f"{weights}_{dtype}.safetensors"
            code, _, err = st(capsys, "export", src, "--out", out, "--weights", weights,
                              "--dtype", dtype)
            assert code == 0, err
            size = out.stat().st_size / src.stat().st_size
            assert size < (0.55 if dtype == "fp32" else 0.3)  # the import holds raw + EMA
            score = load_model(out).model.score(io["x"], io["t"])
            assert rel_err(score, reference) <= tol, (weights, dtype)
    code, _, err = st(capsys, "export", src, "--out", tmp_path / "y.safetensors", "--dtype", "fp8")
    assert code == 2 and "Invalid value for '--dtype'" in err and "'fp8' is not one of" in err
    assert not (tmp_path / "y.safetensors").exists()


def _folder_data(root: Path, n: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                root / split / f"{i}.png")
    return root


def test_imported_checkpoint_samples_evaluates_and_fine_tunes(tmp_path, capsys):
    data = _folder_data(tmp_path / "images")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = run_dir / "ckpt.safetensors"
    recipe, nf = ROOT / CASES["ve_ncsnpp"][0], CASES["ve_ncsnpp"][1]
    data_opts = ["data.name=folder", f"data.root={data}", f"train.out_dir={run_dir}",
                 "train.batch_size=2", "train.sample_every=0", "train.device=cpu", "sample.steps=2"]
    code, _, err = st(capsys, "import", pth("ve_ncsnpp"), "--recipe", recipe, *nf, *data_opts,
                      "--out", ckpt)
    assert code == 0, err
    code, _, err = st(capsys, "sample", ckpt, "-n", "2", "--out", tmp_path / "s", "--device", "cpu")
    assert code == 0, err
    assert len(list((tmp_path / "s").rglob("0*.png"))) == 2
    code, out, err = st(capsys, "nll", ckpt, "--limit", "2", "--rtol", "1e-2", "--atol", "1e-2",
                        "--solver-check", "0", "--device", "cpu", "--json", tmp_path / "nll.json")
    assert code == 0, err
    assert np.isfinite(json.loads((tmp_path / "nll.json").read_text())["summary"]["nll_after"]["mean"])
    code, _, err = st(capsys, "diagnose", ckpt, "--limit", "2", "--points", "2", "--samples", "4",
                      "--tau", "0.1", "--batch-size", "4", "--device", "cpu", "--out", tmp_path / "d")
    assert code == 0, err
    assert (tmp_path / "d" / "diagnose.json").is_file()
    code, out, err = st(capsys, "fid", ckpt, "-n", "4", "--ref", data / "train",
                        "--feature-extractor", "st-random-64", "--device", "cpu", "--json",
                        tmp_path / "fid.json")
    assert code == 0, err
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert fid["n_samples"] == 4 and fid["metrics"]
    # fine-tuning: `st train --resume` continues from the imported weights with a fresh Adam
    before = checkpoint.section("model", checkpoint.load(ckpt)[0])
    code, _, err = st(capsys, "train", recipe, *nf, *data_opts, "train.steps=123457",
                      "train.ckpt_every=1", "train.log_every=1", "--resume")
    assert code == 0, err
    tensors, meta = checkpoint.load(ckpt)
    assert meta["step"] == 123457 and any(k.startswith("optim.") for k in tensors)
    after = checkpoint.section("model", tensors)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and len(moved) < len(before)  # one step from the imported weights
    code, _, err = st(capsys, "export", ckpt, "--out", tmp_path / "e.safetensors")
    assert code == 0, err
    (tmp_path / "e.safetensors").replace(ckpt)  # an export is not a training state
    code, _, err = st(capsys, "train", recipe, *nf, *data_opts, "train.steps=123458", "--resume")
    assert code == 2 and "inference-only export" in err


def test_python_api_from_the_docs(imported, tmp_path, monkeypatch, capsys):
    """The example of docs/checkpoints.md runs and returns `st sample`'s images as uint8."""
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    code, _, err = st(capsys, "export", imported["ve_ncsnpp"], "--out", tmp_path / "model.safetensors")
    assert code == 0, err
    scope: dict = {}
    exec(compile(example.replace("n=64", "n=2").replace("steps=18", "steps=2"), "doc", "exec"),
         scope)
    x = scope["x"]
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # nothing written
    code, _, err = st(capsys, "sample", tmp_path / "model.safetensors", "-n", "2", "--sampler", "heun",
                      "--steps", "2", "--seed", "0", "--out", tmp_path / "s", "--device", "cpu")
    assert code == 0, err
    for i in range(2):
        png = np.asarray(Image.open(tmp_path / "s" / "000000" / f"{i:06d}.png"))
        assert np.array_equal(png, x[i].permute(1, 2, 0).numpy())
    # bad arguments are one clear UserError, not a TypeError from deep inside
    from stcli import load, sample

    model = load(tmp_path / "model.safetensors")
    for kwargs, message in (({"n": 2.5}, "n must be a whole number, got 2.5"),
                            ({"n": 2, "seed": "0"}, "seed must be a whole number"),
                            ({"n": True}, "n must be a whole number, got True")):
        with pytest.raises(UserError, match=message):
            sample(model, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="this machine has no CUDA GPU"):
            load(tmp_path / "model.safetensors", device="cuda")
