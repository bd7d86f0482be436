"""safetensors checkpoints: tensors plus JSON metadata, written atomically, loaded without code.

A checkpoint holds the model, its EMA, the optimizer state, every RNG state, the step and
the resolved recipe.  Writes go to a temporary file in the same folder, are fsynced, then
renamed over the target, so an interrupted write never damages the last good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from stcli.errors import UserError
from stcli.runlock import TMP_PREFIX, is_disk_full

FORMAT = "st-checkpoint/1"


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write `tensors` and JSON-encoded `meta` to `path`.

    The file is written in a private folder ``.st-tmp-*`` next to `path` (safetensors adds its
    own temporary file there), fsynced, then renamed over `path`; on any failure the folder is
    removed and `path` is untouched.  A full disk is a UserError naming the space needed.
    """
    path = Path(path)
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()}}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=TMP_PREFIX))
    except OSError as err:
        raise _write_error(path, err, tensors, metadata) from None
    tmp = tmp_dir / path.name
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # readable as the umask allows (safetensors: 0600)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as err:
        raise _write_error(path, err, tensors, metadata) from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (a checkpoint's content identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_error(path: Path, err: BaseException, tensors: dict, metadata: dict) -> UserError:
    if is_disk_full(err):
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + len(json.dumps(metadata))
        return UserError(f"no space left on the device to write {path} (it needs about "
                         f"{need / 2**20:.1f} MiB free); the previous file there is untouched")
    return UserError(f"cannot write {path}: {err}")


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
    meta = {}
    for k, v in metadata.items():
        if k != "format":
            try:
                meta[k] = json.loads(v)
            except ValueError:
                raise UserError(f"checkpoint {path} is damaged: its metadata {k!r} is not valid "
                                "JSON") from None
    return tensors, meta


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def section(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}
