"""The run folder of `st train`: what it must hold before a run starts or resumes, its
preparation, `--resume auto`, resuming a run folder by name, and pruning old snapshots.

A run folder holds ``recipe.yaml`` (resolved), ``ckpt.safetensors`` (latest), the kept
snapshots ``ckpt-<step>.safetensors``, the logs and ``samples/``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from stcli.components.recipe import Recipe, Train, apply_overrides, parse_recipe, read_yaml
from stcli.infra import distributed
from stcli.infra.console import info
from stcli.infra.errors import UserError
from stcli.infra.outputs import refuse_foreign
from stcli.infra.runlock import remove_temporaries, temporary_name

CHECKPOINT = "ckpt.safetensors"  # the latest checkpoint of a run folder, the one a resume reads

# Fields of `train` that may change when a run is resumed (they leave the model's trajectory
# alone); everything else must match the checkpoint.  micro_batches / batch_per_device split the
# same global batch (train.batch_size) differently: the step's expectation is the same, though
# its noise draws, keyed by micro-batch, are not.  log, heldout_*: experiment tracking.
RESUMABLE = {"steps", "log_every", "ckpt_every", "snapshot_every", "sample_every", "grid_size",
             "workers", "device", "out_dir", "channels_last", "tf32", "keep_last",
             "snapshot_weights", "micro_batches", "batch_per_device", "compile", "log", "eval_every",
             "heldout_every", "heldout_size"}


RUN_FILES = ("recipe.yaml", "log.jsonl", "log.csv", CHECKPOINT, "tensorboard")  # st train's own


def check_is_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"train.out_dir {out_dir} exists and is not a folder")


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """What the run folder must (not) hold; writes nothing."""
    ckpt_path = out_dir / CHECKPOINT
    check_is_folder(out_dir)
    if resume and not ckpt_path.is_file():
        raise UserError(f"nothing to resume: {ckpt_path} "
                        f"{'is not a file' if ckpt_path.exists() else 'does not exist'}")
    if not resume and ckpt_path.exists():
        raise UserError(f"{out_dir} already holds a run; continue it with --resume or "
                        "choose another train.out_dir")
    snapshots = sorted(p.name for p in out_dir.glob("ckpt-*.safetensors")) if out_dir.is_dir() else []
    if not resume and snapshots:  # a run stopped before its first checkpoint: its snapshots
        raise UserError(f"{out_dir} holds snapshots of an earlier run ({', '.join(snapshots[:3])}"
                        f"{', ...' if len(snapshots) > 3 else ''}) but no {CHECKPOINT} to resume; "
                        "a new run would mix its snapshots with them: choose another "
                        "train.out_dir or delete them")
    if not resume and out_dir.is_dir() and not any((out_dir / f).exists() for f in RUN_FILES):
        refuse_foreign(out_dir, (), f"train.out_dir {out_dir} holds other files ({{files}}) and is "
                       "not a run folder of st train; choose a new or empty folder")


def prepare_out_dir(out_dir: Path, resume: bool, ckpt_id: tuple[int, int, int] | None, recipe: Recipe,
                    open_log: Callable[[], None]) -> None:
    """Under the run lock, once every check has passed: the folder as this run needs it
    (`ckpt_id`: the `file_id` of the checkpoint the run resumed from; `open_log`: opens the
    run's logs in the folder)."""
    check_out_dir(out_dir, resume)  # again: another run may have finished since
    ckpt_path = out_dir / CHECKPOINT
    if resume and file_id(ckpt_path) != ckpt_id:
        raise UserError(f"{ckpt_path} changed while it was being read; run again")
    try:
        removed = remove_temporaries(out_dir)
        if removed:
            info(f"removed {removed} temporary file(s) left in {out_dir} by an interrupted run")
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "recipe.yaml", recipe.to_yaml())
        open_log()
    except OSError as err:
        raise UserError(f"cannot write to the output folder {out_dir}: {err}") from None


def claim_out_dir(ctx: distributed.Context, prepare: Callable[[], None]) -> None:
    """`prepare` the run folder on rank 0; every rank learns whether it worked."""
    with distributed.checked(ctx, "prepare the run folder"):
        if ctx.is_main:
            prepare()


def load_run_folder(folder: Path, overrides: list[str]) -> Recipe:
    """The recipe of run folder `folder` (its recipe.yaml, train.out_dir = the folder) with
    `overrides`, each of a field that may change on resume (RESUMABLE)."""
    path = folder / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{folder} is a folder without recipe.yaml, not a run folder of st train; "
                        "give a recipe file, or the folder st train wrote")
    apply_overrides({}, overrides)  # their form, first
    allowed = sorted(RESUMABLE & Train.model_fields.keys() - {"out_dir"})
    for item in overrides:
        key = item.partition("=")[0]
        section, _, field = key.partition(".")
        if section != "train" or field not in allowed:
            raise UserError(f"{key} cannot be overridden when resuming the run folder {folder}: it "
                            f"would change the run's trajectory (may change: "
                            f"{', '.join('train.' + f for f in allowed)}); start a new run with "
                            "a recipe file instead")
    data = read_yaml(path)
    if not isinstance(data.get("train", {}), dict):
        raise UserError(f"recipe {path} is invalid: train must be a section")
    keys = {item.partition("=")[0] for item in overrides}
    for new, old in (("batch_per_device", "micro_batches"), ("micro_batches", "batch_per_device")):
        if f"train.{new}" in keys and f"train.{old}" not in keys:  # one replaces the other
            data.get("train", {}).pop(old, None)
    data = apply_overrides(data, overrides)
    data["train"] = {**data.get("train", {}), "out_dir": str(folder)}
    return parse_recipe(data, source=f"recipe {path}")


def prune_snapshots(out_dir: Path, keep: int, step: int) -> None:
    """Delete all but the newest `keep` snapshots ckpt-<n>.safetensors with n <= `step` (later
    ones, left by a run that crashed before its next checkpoint, are overwritten in turn)."""
    snapshots = sorted((int(m[1]), p) for p in out_dir.glob("ckpt-*.safetensors")
                       if (m := re.fullmatch(r"ckpt-(\d+)\.safetensors", p.name)) and int(m[1]) <= step)
    for _, path in snapshots[:-keep]:
        path.unlink(missing_ok=True)


def resolve_resume(resume: bool | str, recipe: Recipe, ctx: distributed.Context) -> bool:
    """`--resume auto`: resume if the run folder holds ckpt.safetensors, else start afresh; a
    folder holding only snapshots is refused (never a silent fresh start over a trained run)."""
    if resume != "auto":
        return bool(resume)
    ckpt = recipe.out_dir / CHECKPOINT
    if ckpt.exists():
        if ctx.is_main:
            info(f"--resume auto: {ckpt} exists; resuming")
        return True
    snapshots = sorted(recipe.out_dir.glob("ckpt-*.safetensors"))
    if snapshots:
        raise UserError(f"--resume auto: {recipe.out_dir} holds snapshots ({snapshots[-1].name}, ...) "
                        "but no ckpt.safetensors; copy the snapshot to continue from to "
                        "ckpt.safetensors, or choose another train.out_dir to start afresh")
    if ctx.is_main:
        info(f"--resume auto: no checkpoint in {recipe.out_dir}; starting afresh")
    return False


def check_compatible(saved: Recipe, requested: Recipe, path: Path) -> None:
    """Refuse to resume (or evaluate) with a recipe that differs in anything but run settings."""
    a, b = saved.to_dict(), requested.to_dict()
    for d in (a, b):
        d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE}
    diffs = sorted(_diff(a, b))
    if diffs:
        raise UserError(f"the recipe differs from the one in {path} at: {', '.join(diffs)}")


def _diff(a, b, prefix: str = ""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a.keys() | b.keys():
            yield from _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    elif a != b:
        yield prefix.rstrip(".")


def file_id(path: Path) -> tuple[int, int, int]:
    """Inode, modification time and size of `path`: whether a file changed between two looks."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


def write_text(path: Path, text: str) -> None:
    """Atomically replace `path` by `text` (a temporary file, then a rename)."""
    tmp = path.with_name(temporary_name(path.name))
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
