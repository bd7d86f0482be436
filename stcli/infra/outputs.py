"""Every path st writes that the user named (--out, --json, train.out_dir, ...): one policy,
checked before any work starts.

* Never an existing file unless the command was given ``--overwrite``; never, even then, a
  non-regular file (a device, FIFO or socket: replacing it would swap a system file for a
  regular one), a folder where a file is meant, or one of the command's own inputs.
* The folder a file goes into must exist and be writable; a folder output may be created, inside
  a writable existing folder.
* A result file is written atomically; if writing it fails after the work was done, the result
  is printed first, so that hours of computing are not lost with it.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from stcli.infra.console import console
from stcli.infra.errors import UserError
from stcli.infra.runlock import LOCK, TMP_PREFIX, atomic


def _named(path: str | Path, what: str) -> Path:
    if str(path).strip() == "":
        raise UserError(f"{what} is empty; name a path")
    return Path(path).expanduser()


def _same(a: Path, b: str | Path) -> bool:
    try:
        return a.exists() and Path(b).exists() and os.path.samefile(a, b)
    except OSError:
        return False


def output_file(path: str | Path, what: str, *, overwrite: bool = False,
                inputs: Iterable[str | Path] = (), make_parents: bool = False) -> Path:
    """`path` may be written as a regular file (UserError naming `what` otherwise);
    `make_parents`: its folder may be made, inside a writable existing one."""
    path = _named(path, what)
    for source in inputs:
        if _same(path, source) or path.resolve() == Path(source).expanduser().resolve():
            raise UserError(f"{what} {path} is the command's input {source}; choose another file")
    if path.exists() or path.is_symlink():
        mode = os.lstat(path).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{what} {path} is a folder; name a file")
        if not stat.S_ISREG(mode):
            raise UserError(f"{what} {path} exists and is not a regular file (a device, pipe, "
                            "socket or link); st writes only regular files")
        if not overwrite:
            raise UserError(f"{what} {path} exists; choose another file or pass --overwrite")
    if make_parents:
        output_folder(path.parent, f"the folder of {what}")
    elif not path.parent.is_dir():
        raise UserError(f"the folder of {what} {path} does not exist")
    elif not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"the folder of {what} {path} is not writable")
    return path


def output_folder(path: str | Path, what: str) -> Path:
    """`path` is an existing folder or can be made (its nearest existing ancestor is a
    writable folder); UserError naming `what` otherwise."""
    path = _named(path, what)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {existing} is not writable")
    return path


def finite_or_null(obj):
    """`obj` with every non-finite float (nan, ±inf) replaced by None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 1) -> str:
    """Strict JSON (RFC 8259: no NaN or Infinity, which strict parsers refuse): a non-finite
    number is written as null."""
    return json.dumps(finite_or_null(obj), indent=indent, allow_nan=False) + "\n"


def write_result(path: Path, text: str, what: str) -> None:
    """Write `text` to `path` atomically (making its folder); if that fails, print `text` and
    then fail."""
    try:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot make the folder of {path} ({err.strerror})") from None
        with atomic(path) as tmp:
            tmp.write_text(text)
    except UserError as err:
        console.out(text, highlight=False)
        raise UserError(f"{err}; the {what} is printed above") from None


def refuse_foreign(folder: Path, ours: Iterable[str], message: str) -> None:
    """UserError `message` (with "{files}": the first few names) if `folder` holds entries other
    than `ours`, st's lock and its temporaries: a folder of the user's, never written into."""
    other = sorted(p.name for p in folder.iterdir()
                   if p.name not in {*ours, LOCK} and not p.name.startswith(TMP_PREFIX))
    if other:
        raise UserError(message.format(files=", ".join(other[:3]) + (", ..." if len(other) > 3 else "")))
