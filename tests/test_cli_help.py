"""Help a person can act on: `st --version`, and examples at the end of `st COMMAND --help`
that are real command lines (parsed by st's own parser) naming files that exist."""

import re
import shlex
from typing import get_args

import pytest
from conftest import ROOT, run_st, st

from stcli.jobs.cli import _command
from stcli.jobs.helptext import DOCS, EXAMPLES


def test_version_matches_the_package_metadata():
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    res = run_st("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"st {version}"


@pytest.mark.parametrize("command", sorted(EXAMPLES))
def test_help_ends_with_examples(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = st(capsys, command, "--help")
    assert code == 0, err
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    tail = lines[-(2 * len(EXAMPLES[command]) + 2):]
    assert tail[0] == "Examples:" and tail[-1] == f"More: {DOCS[command]}"
    assert tail[1:-1:2] == [f"# {note}" for _, note in EXAMPLES[command]]
    assert tail[2:-1:2] == [cmd for cmd, _ in EXAMPLES[command]]  # one line each at 80 columns
    assert (ROOT / DOCS[command]).is_file()
    assert "<bool>" not in out and "--help" in out  # flags, --help too, show no type


@pytest.mark.parametrize("example", [cmd for cmds in EXAMPLES.values() for cmd, _ in cmds])
def test_every_example_parses(example):
    """st's parser accepts each example (options, values, arguments); recipes named exist."""
    words = shlex.split(example)
    words = words[words.index("st") + 1:]
    assert words[0] in EXAMPLES
    parse(words)  # raises a usage error on anything unknown
    for word in words:
        if word.startswith("recipes/"):
            assert (ROOT / word).is_file(), word


def test_a_wrong_example_would_be_caught():
    with pytest.raises(Exception, match="No such option"):
        parse(["sample", "x.safetensors", "-n", "4", "--no-such-option"])
    with pytest.raises(Exception, match="valid integer"):
        parse(["sample", "x.safetensors", "-n", "four"])


def parse(words: list[str]) -> None:
    """Parse `st WORDS` as the command `words[0]` would, without running it."""
    command = _command(words).commands[words[0]]
    command.make_context(words[0], words[1:])


def test_option_choices_are_the_values_their_modules_accept(capsys, monkeypatch):
    """Each fixed-choice option lists exactly what the code behind it accepts, and --sampler
    whatever SAMPLERS holds when the command runs; another value is a usage error (exit 2)."""
    from stcli.components import likelihood, metrics
    from stcli.components.samplers.pc import PC
    from stcli.infra.registry import SAMPLERS
    from stcli.jobs import cli, export, tune

    pc = PC.model_fields
    pairs = [(cli.Predictor, pc["predictor"].annotation), (cli.Corrector, pc["corrector"].annotation),
             (cli.TimeVariable, likelihood.TIME_VARIABLES), (cli.ErrorNorm, likelihood.ERROR_NORMS),
             (cli.Resize, metrics.RESIZE_MODES), (cli.Dtype, tuple(export.DTYPES)),
             (cli.TuneSampler, tune.TUNABLE)]
    for literal, accepted in pairs:
        assert get_args(literal) == (get_args(accepted) or accepted)
    params = {p.opts[0]: p for p in _command(["sample"]).commands["sample"].params}
    assert get_args(params["--sampler"].type_descriptor.annotation) == tuple(SAMPLERS.names())
    for argv, option in [(["sample", "x", "-n", 1, "--sampler", "dpm"], "--sampler"),
                         (["sample", "x", "-n", 1, "--format", "jpg"], "--format"),
                         (["nll", "x", "--correction", "later"], "--correction"),
                         (["export", "x", "--out", "y", "--weights", "best"], "--weights")]:
        code, out, err = st(capsys, *argv)
        assert code == 2 and f"Invalid value for '{option}'" in err and "Traceback" not in err
        assert not out
    monkeypatch.setenv("COLUMNS", "200")  # help lines unwrapped
    code, out, _ = st(capsys, "nll", "--help")
    assert code == 0 and "<rademacher|gaussian|exact>" in out and "<t|lambda|lambda_scaled>" in out
