"""`st import` of files the Soft Truncation release wrote (tests/fixtures/st_official) gives the
released function with the paper's recipes as they are: the import sets what the release
computes (README of the fixtures: UNCSN++ nets receive log sigma; the 256x256 release is a VE
SDE, sigma 0.01 -> 348), says so, and matches the release's own scores."""

import re

import pytest
import torch
from conftest import ROOT, st
from safetensors.torch import load_file

from stcli.components.loading import load_model
from stcli.components.recipe import load_recipe
from stcli.infra import checkpoint
from stcli.jobs import importer

FIX = ROOT / "tests" / "fixtures" / "st_official"
RELEASES = {  # fixture -> (recipe, the fixture's depth, settings the import must set)
    "celeba_uncsnpp_rve": ("celeba_uncsnpp_rve", 2,
                           {"net.time_input": "log_sigma", "truncation.name": "hard"}),
    "celebahq_uncsnpp_rve_nll_st": ("celebahq_uncsnpp_rve_nll_st", 1,
                                    {"net.time_input": "log_sigma", "sde.name": "ve",
                                     "sde.sigma_min": 0.01, "sde.sigma_max": 348.0,
                                     "loss.weighting": "variance", "loss.time_sampling": "uniform",
                                     "truncation.name": "hard"}),
    "celeba_uddpmpp_vp_nll_st": ("celeba_uddpmpp_vp_nll_st", 2, {}),
}


def pth(name: str):
    return FIX / f"st_official_{name}_nf16.pth"


def public_io(name: str) -> dict:
    return load_file(FIX / f"st_official_{name}_nf16_public_io.safetensors")


def args(name: str) -> list:
    recipe, depth, _ = RELEASES[name]
    return ["--recipe", ROOT / "recipes" / f"{recipe}.yaml", "net.nf=16", f"net.num_res_blocks={depth}"]


def per_image_rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """max |a - b| / max |b| of each image."""
    return (a - b).flatten(1).abs().amax(1) / b.flatten(1).abs().amax(1)


def field(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def recipe_of(name: str):
    recipe, depth, _ = RELEASES[name]
    return load_recipe(ROOT / "recipes" / f"{recipe}.yaml", ["net.nf=16", f"net.num_res_blocks={depth}"])


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """Each release file imported with its recipe as is: (path, the import's report)."""
    root = tmp_path_factory.mktemp("releases")
    return {name: (root / f"{name}.safetensors",
                   importer.import_checkpoint(pth(name), recipe_of(name), root / f"{name}.safetensors"))
            for name in RELEASES}


@pytest.mark.parametrize("name", list(RELEASES))
def test_release_imports_as_the_released_function(imported, name):
    """EMA and raw weights give the release's score and score_raw within 1e-4 (max relative,
    per image) at every public t, down to t = 1e-5 where UNCSN++'s time input differs most."""
    path, _ = imported[name]
    io = public_io(name)
    for weights, key in (("ema", "score"), ("raw", "score_raw")):
        with torch.no_grad():
            score = load_model(path, weights).model.score(io["x"], io["t"])
        err = per_image_rel_err(score, io[key])
        assert err.max() <= 1e-4, (weights, dict(zip(io["t"].tolist(), err.tolist())))


@pytest.mark.parametrize("name", list(RELEASES))
def test_the_import_writes_and_names_each_setting_it_changed(imported, name):
    path, report = imported[name]
    recipe = checkpoint.load(path)[1]["recipe"]
    sets = RELEASES[name][2]
    for key, value in sets.items():
        assert field(recipe, key) == value, key
    touched = [re.match(r"(\S+):", line)[1] for line in report["changes"]]
    sections = {key.split(".")[0] if key.split(".")[0] in ("sde", "truncation") else key for key in sets}
    assert sorted(touched) == sorted(sections), report["changes"]  # one line each, no other
    assert all("the recipe said" in line for line in report["changes"])


def test_the_cli_prints_one_line_per_changed_setting(tmp_path, capsys):
    name = "celebahq_uncsnpp_rve_nll_st"
    code, printed, err = st(capsys, "import", pth(name), *args(name), "--out", tmp_path / "hq.safetensors")
    assert code == 0, err
    lines = [line for line in printed.splitlines() if line.startswith("as released: ")]
    assert len(lines) == 5 and any(line.startswith("as released: sde: {name: ve, sigma_min: 0.01, "
                                                   "sigma_max: 348.0} (the recipe said {name: rve")
                                   for line in lines), lines


def test_as_recipe_keeps_the_paper_definition_and_warns(tmp_path, capsys):
    """UNCSN++ with the recipe's unbounded time input: the same function at sigma >= 0.01, a
    different one below (t = 1e-5 in the RVE); the user is told so."""
    out = tmp_path / "paper.safetensors"
    code, printed, err = st(capsys, "import", pth("celeba_uncsnpp_rve"), *args("celeba_uncsnpp_rve"),
                            "--out", out, "--as-recipe")
    assert code == 0, err
    assert "as released" not in printed
    assert re.search(r"warning: --as-recipe: the imported function differs from the release's: "
                     r"net\.time_input: log_sigma \(the recipe said unbounded\)", err)
    assert checkpoint.load(out)[1]["recipe"]["net"]["time_input"] == "unbounded"
    io = public_io("celeba_uncsnpp_rve")
    with torch.no_grad():
        err = per_image_rel_err(load_model(out).model.score(io["x"], io["t"]), io["score"])
    small = io["t"] < 1e-4
    assert err[~small].max() <= 1e-4 and err[small].min() > 0.1


def test_a_file_trained_on_another_sigma_range_is_refused(tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    code, _, err = st(capsys, "import", pth("celeba_uncsnpp_rve"), *args("celeba_uncsnpp_rve"),
                      "sde.sigma_min=0.01", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds the noise table sigma 0.001 -> 90 (module.sigmas" in err
    assert "set sde.sigma_min=0.001" in err and not out.exists()
    assert "it does not say which SDE trained it" in err  # a VP file holds such a table too


@pytest.mark.parametrize("name,eps", [("celeba_uncsnpp_rve", 1e-3), ("celeba_uddpmpp_vp_nll_st", 5e-5)])
def test_another_eps_at_import_still_gives_the_released_function(tmp_path, capsys, name, eps):
    """st's sde.eps is truncation.eps; the release builds the RVE's sigma(t) and the UDDPM++
    time input at 1e-5 whatever truncation_time says. An import with another eps computed
    another function (the RVE at eps 1e-3: 8e4 relative error at t = 1e-3): the import sets the
    release's eps back, naming it."""
    out = tmp_path / "x.safetensors"
    code, printed, err = st(capsys, "import", pth(name), *args(name), f"truncation.eps={eps}",
                            "--out", out)
    assert code == 0, err
    assert re.search(rf"as released: truncation.eps: 1e-05 \(the recipe said {eps:g}\)", printed), printed
    assert checkpoint.load(out)[1]["recipe"]["truncation"]["eps"] == 1e-5
    io = public_io(name)
    with torch.no_grad():
        assert per_image_rel_err(load_model(out).model.score(io["x"], io["t"]), io["score"]).max() <= 1e-4


def test_a_ve_recipe_with_the_999t_time_input_is_refused(tmp_path, capsys):
    """No official VE/RVE net takes the positional embedding of 999 t: such a recipe labels
    the file with a function it never computed (a VP DDPM++ file passes the sigma-table check)."""
    out = tmp_path / "x.safetensors"
    code, _, err = st(capsys, "import", pth("celeba_uncsnpp_rve"), *args("celeba_uncsnpp_rve"),
                      "net.time_input=t999", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    assert "pairs a RVE SDE with the time input t999" in " ".join(err.split())


@pytest.mark.parametrize("name", list(RELEASES))
def test_float32_scores_keep_float64_digits(imported, name):
    """The Fourier phase 2 pi W log sigma reaches thousands of radians at t = 1e-5: computed from
    t in float64, the float32 net is within 1e-5 of the same net run in float64."""
    path, _ = imported[name]
    io = public_io(name)
    first = [int((io["t"] == v).nonzero()[0]) for v in io["t"].unique()]  # one image per time
    x, t = io["x"][first], io["t"][first]  # (the 256^2 net in float64 is slow)
    model = load_model(path).model
    with torch.no_grad():
        s32 = model.score(x, t)
        s64 = model.double().score(x.double(), t.double())
    assert t.min() <= 1e-5 and len(t) >= 4
    assert per_image_rel_err(s32.double(), s64).max() <= 1e-5


def test_256_walk_follows_the_release_order():
    """The release's all_modules list at 256x256: no entries for the parameter-free pyramid
    resamplers, layerspp.Combine's conv named Conv_0; every tensor of the file is used once."""
    recipe = recipe_of("celebahq_uncsnpp_rve_nll_st")
    modules = list(importer.official_modules(recipe.net, 3, 256))
    state = torch.load(pth("celebahq_uncsnpp_rve_nll_st"), weights_only=True)["model"]
    indices = {int(k.split(".")[2]) for k in state if k.startswith("module.all_modules.")}
    assert len(modules) == max(indices) + 1 == 62
    used = [n for row in importer.mapping(recipe) for n in row.official]
    assert sorted(f"module.{n}" for n in used) == sorted(k for k in state if k != "module.sigmas")
    assert [kind for kind, _ in modules].count("combine") == 6
    assert all(n.split(".")[2] == "Conv_0" for n in used
               if modules[int(n.split(".")[1])][0] == "combine")


def test_damaged_release_files_are_refused(tmp_path, capsys):
    """A NaN weight (raw or EMA), integer weights, a negative step: one line, exit 2, no output."""
    state = torch.load(pth("celeba_uddpmpp_vp_nll_st"), weights_only=True)
    key = "module.all_modules.0.weight"  # the time embedding's first Dense
    nan_raw = {**state, "model": {**state["model"], key: state["model"][key].clone().fill_(float("nan"))}}
    shadow = [t.clone() for t in state["ema"]["shadow_params"]]
    shadow[5][0] = float("inf")
    inf_ema = {**state, "ema": {**state["ema"], "shadow_params": shadow}}
    ints = {**state, "model": {**state["model"], key: state["model"][key].to(torch.int32)}}
    cases = {"nan": (nan_raw, "holds .* non-finite value"),
             "inf ema": (inf_ema, r"\(its EMA copy\).*non-finite"),
             "int": (ints, "holds int32 values, not floating-point weights"),
             "negative step": ({**state, "step": -3}, "its step is -3")}
    out = tmp_path / "out" / "x.safetensors"
    out.parent.mkdir()
    for case, (obj, message) in cases.items():
        src = tmp_path / f"{case}.pth"
        torch.save(obj, src)
        code, _, err = st(capsys, "import", src, *args("celeba_uddpmpp_vp_nll_st"), "--out", out)
        assert code == 2 and re.search(message, err), (case, err)
        assert len(err.strip().splitlines()) == 1 and list(out.parent.iterdir()) == [], case


SHORT = {"net.time_input": "log σ", "sde": "VE σ 0.01 → 348", "loss.weighting": "variance weighting",
         "loss.time_sampling": "uniform t", "truncation": "τ = ε"}


def test_the_docs_release_table_says_what_the_import_sets():
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    table = text[text.index("| paper row | recipe | `st import` sets |"):]
    rows = re.findall(r"^\| [^|]+ \| `(\w+)` \| ([^|]+) \|", table, re.M)
    assert len(rows) >= 25
    for recipe, sets in rows:
        changes = importer.released_recipe(load_recipe(ROOT / "recipes" / f"{recipe}.yaml")).changes
        said = "; ".join(SHORT[line.split(":")[0]] for line in changes) or "–"
        assert sets.strip() == said, recipe
