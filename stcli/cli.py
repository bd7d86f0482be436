"""The `st` command line: parses, validates, and calls one function per subcommand.

User errors (UserError, bad options) print one clear message and exit with code 2.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

from stcli.console import error, info
from stcli.errors import TrainingStopped, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and evaluate score-based diffusion models with Soft Truncation.")
recipe_app = typer.Typer(no_args_is_help=True, help="Inspect and check recipes.")
app.add_typer(recipe_app, name="recipe")

RecipeArg = Annotated[str, typer.Argument(help="Path of a YAML recipe.", metavar="RECIPE")]
Overrides = Annotated[Optional[list[str]], typer.Argument(  # noqa: UP007  (typer needs Optional)
    help="Dotted overrides key.path=value (values parsed as YAML), e.g. train.steps=100.",
    metavar="[KEY=VALUE]...", show_default=False)]


@app.command()
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in train.out_dir from its ckpt.safetensors.")] = False,
    procs: Annotated[int, typer.Option(
        "--procs", min=1, help="Processes on this node (relaunches through torchrun).")] = 1,
):
    """Train a score model from RECIPE (Soft Truncation, EMA, checkpoints, sample grids)."""
    from stcli import distributed
    from stcli.recipe import load_recipe

    spec = load_recipe(recipe, overrides)  # validate before spawning anything
    if procs > 1 and not distributed.is_launched():
        argv = ["train", recipe, *(overrides or []), *(["--resume"] if resume else [])]
        raise typer.Exit(distributed.relaunch(procs, argv))
    from stcli.train import train as run_training

    result = run_training(spec, resume=resume)
    if result.step and _is_rank0():
        info(f"done: step {result.step}, loss {result.loss:.4g}; "
             f"checkpoint {result.out_dir / 'ckpt.safetensors'}")


@recipe_app.command("show")
def recipe_show(
    recipe: RecipeArg,
    overrides: Overrides = None,
    params: Annotated[bool, typer.Option("--params", help="Also print the net's parameter count.")] = False,
):
    """Print the resolved recipe (every default filled in), validated."""
    from stcli.recipe import load_recipe

    spec = load_recipe(recipe, overrides)
    info(spec.to_yaml().rstrip())
    if params:
        info(f"# net parameters: {count_parameters(spec):,}")


@recipe_app.command("validate")
def recipe_validate(recipe: RecipeArg, overrides: Overrides = None):
    """Check RECIPE; exit code 0 if it is valid, 2 with the offending fields if not."""
    from stcli.recipe import load_recipe

    spec = load_recipe(recipe, overrides)
    info(f"{recipe}: valid ({spec.name})")


def count_parameters(spec) -> int:
    """Parameters of the recipe's net, built on the meta device (no memory, instant)."""
    import torch

    with torch.device("meta"):
        backbone = spec.net.create(shape=spec.data.shape)
    return sum(p.numel() for p in backbone.parameters())


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer handles usage errors (exit 2); ours are turned into one message."""
    try:
        app(args=argv, prog_name="st")
    except UserError as err:
        rank = os.environ.get("RANK")
        error(f"[rank {rank}] {err}" if rank not in (None, "0") else str(err))
        sys.exit(2)
    except TrainingStopped as err:
        if _is_rank0():
            error(str(err))
        sys.exit(128 + err.signum)
