"""Components registered from outside the package, after `stcli.components.recipe` is imported, are
accepted by recipes and train (the registry's promise): a dataset and a truncation defined here."""

import json
import math
from typing import Literal

import pytest
import torch
from conftest import st

from stcli.components.data import DataSpec, InMemory
from stcli.components.recipe import parse_recipe
from stcli.components.samplers.base import Sampler
from stcli.components.truncation import Truncation
from stcli.infra.errors import UserError
from stcli.infra.registry import DATASETS, SAMPLERS, TRUNCATIONS
from stcli.infra.seeding import generator
from stcli.jobs.train import train


class Line(DataSpec):
    """Points (s, 2s) with s uniform on [-1, 1]: a dataset a user's package might add."""

    name: Literal["plugin_line"] = "plugin_line"
    n: int = 64

    @property
    def shape(self) -> tuple[int, ...]:
        return (2,)

    def load(self, split: str):
        s = torch.linspace(-1, 1, self.n)
        return InMemory(torch.stack([s, 2 * s], 1))

    def transform(self, batch, generator=None):
        return batch.float()


class LogUniform(Truncation):
    """tau log-uniform on [eps, T]: F(t) = log(t/eps)/log(T/eps)."""

    name: Literal["plugin_loguniform"] = "plugin_loguniform"

    def sample(self, generator=None) -> float:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        return self.eps * (self.T / self.eps) ** u

    def cdf(self, t):
        t = torch.as_tensor(t)
        return torch.log(t.clamp(self.eps, self.T) / self.eps) / math.log(self.T / self.eps)


def recipe_data(tmp_path) -> dict:
    return {"name": "plugin", "seed": 4, "data": {"name": "plugin_line", "n": 64},
            "sde": {"name": "vp"}, "net": {"name": "mlp", "hidden": 16, "layers": 2},
            "truncation": {"name": "plugin_loguniform", "eps": 1e-3},
            "loss": {"weighting": "g2_P", "weighting_P": {"name": "plugin_loguniform", "eps": 1e-3}},
            "train": {"steps": 2, "batch_size": 16, "log_every": 1, "ckpt_every": 2,
                      "sample_every": 0, "device": "cpu", "out_dir": str(tmp_path / "run")}}


@pytest.fixture
def plugins():
    DATASETS.register(Line)
    TRUNCATIONS.register(LogUniform)
    try:
        yield
    finally:
        DATASETS.unregister("plugin_line")
        TRUNCATIONS.unregister("plugin_loguniform")


def test_unregistered_names_are_refused(tmp_path):
    with pytest.raises(UserError, match="data.name: unknown name 'plugin_line'"):
        parse_recipe(recipe_data(tmp_path))


def test_components_registered_after_import_train(plugins, tmp_path):
    recipe = parse_recipe(recipe_data(tmp_path))
    assert isinstance(recipe.data, Line) and isinstance(recipe.truncation, LogUniform)
    assert isinstance(recipe.loss.weighting_P, LogUniform)
    assert "plugin_line" in DATASETS.names()
    result = train(recipe)
    log = [json.loads(line) for line in (result.out_dir / "log.jsonl").read_text().splitlines()]
    # tau of step k is the plugin's draw from the generator (seed, "tau", k)
    expected = [LogUniform(eps=1e-3).sample(generator("cpu", 4, "tau", k)) for k in range(2)]
    assert [r["tau_mean"] for r in log] == pytest.approx(expected, rel=1e-12)
    assert all(1e-3 <= t <= 1 for t in expected) and math.isfinite(result.loss)
    assert "plugin_loguniform" in (result.out_dir / "recipe.yaml").read_text()


class PriorOnly(Sampler):
    """No integration: the prior draw, then the Tweedie step at eps (1 NFE)."""

    name: Literal["plugin_prior"] = "plugin_prior"

    def integrate(self, score_fn, sde, x, generator):
        return x, 0


def test_a_sampler_registered_before_the_cli_runs_is_an_st_sample_choice(tiny_ckpt, tmp_path,
                                                                        capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["sample", tiny_ckpt, "-n", 2, "--sampler", "plugin_prior", "--device", "cpu"]
    code, _, err = st(capsys, *args, "--out", tmp_path / "refused")
    assert code == 2 and "'plugin_prior' is not one of" in err and not (tmp_path / "refused").exists()
    SAMPLERS.register(PriorOnly)
    try:
        code, out, err = st(capsys, *args, "--out", tmp_path / "s")
    finally:
        SAMPLERS.unregister("plugin_prior")
    assert code == 0, err
    assert "total NFE 1 " in out and len(list((tmp_path / "s").glob("0*/*.png"))) == 2
