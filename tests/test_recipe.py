"""Recipes: every shipped file validates; bad input gives exit code 2, the dotted field, no traceback."""

import copy

import pytest
import yaml
from conftest import ROOT, run_st, st

from stcli.components.recipe import apply_overrides, load_recipe
from stcli.infra.errors import UserError

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))




@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.truncation.eps == recipe.sde.eps


def test_the_docs_block_of_every_default_is_the_resolved_recipe():
    """docs/recipes.md "Sections": the YAML block equals what the minimal recipe resolves to."""
    import re

    from stcli.components.recipe import Recipe

    text = (ROOT / "docs" / "recipes.md").read_text()
    block = re.search(r"## Sections\n.*?```yaml\n(.*?)```", text, flags=re.S).group(1)
    minimal = {"name": "my_run", "data": {"name": "digits"}, "sde": {"name": "vp"},
               "net": {"name": "unet"}}
    assert yaml.safe_load(block) == Recipe.model_validate(minimal).to_dict()


def test_overrides_are_dotted_and_parsed_as_yaml():
    data = apply_overrides({"a": {"b": 1}}, ["a.b=2.5e-3", "a.c=[1, 2]", "x.y.z=true", "s=hi"])
    assert data == {"a": {"b": 2.5e-3, "c": [1, 2]}, "x": {"y": {"z": True}}, "s": "hi"}
    for bad in ["novalue", "=3", "a..b=1"]:
        with pytest.raises(UserError, match="key.path=value"):
            apply_overrides({}, [bad])
    with pytest.raises(UserError, match="a.b is not a section"):
        apply_overrides({"a": {"b": 1}}, ["a.b.c=1"])


def test_a_dotted_name_replaces_the_component_as_a_mapping_does():
    """`sample.name=heun` kept euler_maruyama's 250 steps (heun's own default is 50), and
    `truncation.name=hard` kept power's k (refused as unknown to hard)."""
    recipe = {"sample": {"name": "euler_maruyama", "steps": 250, "denoise": False},
              "truncation": {"name": "power", "k": 1.0, "eps": 1e-5}}

    def over(*items):
        return apply_overrides(copy.deepcopy(recipe), list(items))

    assert over("sample.name=heun")["sample"] == {"name": "heun"}
    assert over("sample={name: heun}")["sample"] == {"name": "heun"}
    assert over("truncation.name=hard")["truncation"] == {"name": "hard"}
    # with other keys of the section, in either order (the name goes first); the alias too
    for items in (["sample.steps=7", "sample.name=heun"], ["sample.name=heun", "sample.steps=7"],
                  ["sample={steps: 7}", "sample.sampler=heun"], ["sample={sampler: heun, steps: 7}"]):
        assert over(*items)["sample"] == {"name": "heun", "steps": 7}, items
    # the same name keeps the section's settings
    assert over("sample.name=euler_maruyama")["sample"] == recipe["sample"]
    with pytest.raises(UserError, match="already set"):
        over("sample.name=heun", "sample.sampler=pc")


def test_replacing_a_component_says_what_it_drops(capsys):
    """truncation.name=power on a recipe with eps 5e-5 made it the default 1e-5 without a word."""
    data = {"truncation": {"name": "hard", "eps": 5e-5}, "sample": {"sampler": "pc", "snr": 0.17}}
    out = apply_overrides(copy.deepcopy(data), ["truncation.name=power"])
    assert out["truncation"] == {"name": "power"}
    assert "dropped eps: 5e-05 (give them again" in capsys.readouterr().err
    apply_overrides(copy.deepcopy(data), ["truncation={name: power}"])
    assert "dropped eps: 5e-05" in capsys.readouterr().err
    out = apply_overrides(copy.deepcopy(data), ["truncation.name=power", "truncation.eps=5e-5"])
    assert out["truncation"] == {"name": "power", "eps": 5e-5} and capsys.readouterr().err == ""
    # a file's `sampler:` alias is the section's name for the overrides too
    assert apply_overrides(copy.deepcopy(data), ["sample.name=heun"])["sample"] == {"name": "heun"}
    assert apply_overrides(copy.deepcopy(data), ["sample.snr=0.2"])["sample"] == {"name": "pc", "snr": 0.2}


def test_broken_field_exit_code_2_dotted_path_no_traceback(tiny_recipe):
    res = run_st("recipe", "validate", tiny_recipe(), "sde.beta_max=-3", "net.bogus=1")
    assert res.returncode == 2
    assert "sde.beta_max" in res.stderr and "net.bogus: unknown field" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("override, message", [
    ("net.name=resnet9000", "net.name: .*'resnet9000'"),
    ("optim.lr=fast", "optim.lr: Input should be a valid number"),
    ("train.batch_size=10", "not divisible by micro_batches"),
    ("loss.weighting=g2_P", "weighting g2_P needs weighting_P"),
    ("sde.eps=0.1", "sde.eps .* differs from truncation.eps"),
    ("truncation.k=-1", "truncation.k: Input should be greater than or equal to 0"),
    ("data.image_size=0", "data.image_size"),
])
def test_invalid_recipes_name_the_field(capsys, tiny_recipe, override, message):
    extra = ["train.micro_batches=3"] if "batch_size" in override else []
    code, out, err = st(capsys, "recipe", "validate", tiny_recipe(), override, *extra)
    assert code == 2
    assert __import__("re").search(message, err), err


def test_recipe_show_resolves_defaults_and_counts_parameters(capsys, tiny_recipe):
    code, out, err = st(capsys, "recipe", "show", tiny_recipe(), "optim.lr=0.5", "--params")
    assert code == 0, err
    shown = yaml.safe_load(out.split("# net parameters")[0])
    assert shown["optim"]["lr"] == 0.5 and shown["optim"]["beta2"] == 0.999  # a default filled in
    n = int(out.split("# net parameters:")[1].replace(",", ""))
    assert n > 1000


def test_sample_section_accepts_sampler_key(tmp_path, tiny_recipe):
    path = tiny_recipe(sample={"sampler": "euler_maruyama", "steps": 7})
    text = yaml.safe_load(path.read_text())
    text["sample"] = {"sampler": "euler_maruyama", "steps": 7}
    path.write_text(yaml.safe_dump(text))
    assert load_recipe(path).sample.steps == 7


def test_missing_recipe_dataset_and_bad_yaml(capsys, tmp_path, tiny_recipe):
    code, _, err = st(capsys, "recipe", "validate", tmp_path / "nope.yaml")
    assert code == 2 and "does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    code, _, err = st(capsys, "recipe", "validate", bad)
    assert code == 2 and "not valid YAML" in err
    path = tiny_recipe()
    recipe = yaml.safe_load(path.read_text())
    recipe["data"] = {"name": "folder", "root": str(tmp_path / "no-images"), "image_size": 8}
    path.write_text(yaml.safe_dump(recipe))
    code, _, err = st(capsys, "train", path)
    assert code == 2, err
    assert str(tmp_path / "no-images") in err


def test_unknown_option_is_a_usage_error(capsys, tiny_recipe):
    code, _, err = st(capsys, "train", tiny_recipe(), "--nproc", "2")
    assert code == 2 and "No such option" in err
