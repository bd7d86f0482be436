"""safetensors checkpoints: tensors plus JSON metadata, written atomically, loaded without code.

A checkpoint holds the model, its EMA, the optimizer state, every RNG state, the step and
the resolved recipe.  Writes go to a temporary file in the same folder, are fsynced, then
renamed over the target, so an interrupted write never damages the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stcli.errors import UserError

FORMAT = "st-checkpoint/1"


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write `tensors` and JSON-encoded `meta` to `path`."""
    path = Path(path)
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a checkpoint; a clear UserError if it is missing, corrupt or foreign."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({err})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not an st checkpoint (format {metadata.get('format')!r})")
    meta = {k: json.loads(v) for k, v in metadata.items() if k != "format"}
    return tensors, meta


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def section(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
