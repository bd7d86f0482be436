"""safetensors checkpoints: tensors plus JSON metadata, written atomically, loaded without code.

A checkpoint holds the model, its EMA, the optimizer state, every RNG state, the step and
the resolved recipe.  Writes go to a temporary file in the same folder, are fsynced, then
renamed over the target, so an interrupted write never damages the last good checkpoint.
The training-state helpers at the end pack these states for `st train` and restore them on
resume, each part checked.
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

from stcli.infra.errors import UserError
from stcli.infra.runlock import TMP_PREFIX, is_disk_full

FORMAT = "st-checkpoint/1"


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Atomically write `tensors` and JSON-encoded `meta` to `path`.

    The file is written in a private folder ``.st-tmp-*`` next to `path` (safetensors adds its
    own temporary file there), fsynced, then renamed over `path`; on any failure the folder is
    removed and `path` is untouched.  A full disk is a UserError naming the space needed.
    """
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {"format": FORMAT, **{k: json.dumps(v) for k, v in meta.items()},
                CHECKSUM: json.dumps(tensors_sha256(tensors))}
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


CHECKSUM = "tensors_sha256"  # metadata: the sha256 of every tensor, so a changed byte is found


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()


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
        if not _safetensors_header(path):
            raise UserError(f"{path} is not a checkpoint: it is not a safetensors file (st "
                            "checkpoints are written by st train, st import and st export)") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated ({err})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not an st checkpoint (format {metadata.get('format')!r})")
    stored = metadata.get(CHECKSUM)  # checkpoints written before it was recorded have none
    if stored is not None and stored != json.dumps(tensors_sha256(tensors)):
        raise UserError(f"checkpoint {path} is damaged: its tensors differ from the checksum "
                        "written with them (a changed byte: a disk, network or copy error); use "
                        "another copy, or an earlier snapshot")
    meta = {}
    for k, v in metadata.items():
        if k not in ("format", CHECKSUM):
            try:
                meta[k] = json.loads(v)
            except ValueError:
                raise UserError(f"checkpoint {path} is damaged: its metadata {k!r} is not valid "
                                "JSON") from None
    return tensors, meta


def _safetensors_header(path: Path) -> bool:
    """Whether `path` begins as a safetensors file does: an 8-byte little-endian header length
    (below 100 MB, safetensors' own limit) and then a JSON object."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and 0 < int.from_bytes(head[:8], "little") < 100_000_000 and head[8:] == b"{"


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def section(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors saved under `prefix.`, with the prefix removed."""
    p = prefix + "."
    return {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)}


# --- the training state a resume restores, each part checked ------------------------------------
def training_state(model: torch.nn.Module, ema: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   device: torch.device) -> tuple[dict[str, torch.Tensor], list]:
    """The tensors of a resumable checkpoint (weights, EMA weights, Adam's state, the global RNG
    states) and the optimizer's parameter groups (for the metadata, `optim_groups`)."""
    opt = optimizer.state_dict()
    tensors = {**prefixed("model", model.state_dict()), **prefixed("ema", ema.state_dict()),
               "rng.cpu": torch.get_rng_state()}
    for i, state in opt["state"].items():
        tensors.update(prefixed(f"optim.{i}", state))
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors, opt["param_groups"]


def optimizer_state(tensors: dict, meta: dict, model: torch.nn.Module, step: int, path) -> dict:
    """Adam's state dict from a checkpoint, every tensor present with its parameter's shape."""
    params = list(model.parameters())
    groups = meta.get("optim_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups):
        raise UserError(f"checkpoint {path} is damaged: it holds no optimizer settings (optim_groups)")
    if sorted(i for g in groups for i in g["params"]) != list(range(len(params))):
        raise UserError(f"checkpoint {path} does not match the net: its optimizer covers other "
                        "parameters")
    states = {}
    for i, p in enumerate(params):
        state = section(f"optim.{i}", tensors)
        if not state and step == 0:
            continue
        for key, shape in (("exp_avg", p.shape), ("exp_avg_sq", p.shape), ("step", None)):
            if key not in state:
                raise UserError(f"checkpoint {path} is damaged: it lacks the optimizer tensor "
                                f"optim.{i}.{key}")
            if shape is not None and state[key].shape != shape:
                raise UserError(f"checkpoint {path} is damaged: optim.{i}.{key} has shape "
                                f"{tuple(state[key].shape)}, its parameter {tuple(shape)}")
        states[i] = state
    return {"state": states, "param_groups": groups}


def restore_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module, tensors: dict,
                      meta: dict, step: int, path) -> None:
    """Load Adam's state of the checkpoint into `optimizer` (of `model`'s parameters)."""
    try:
        optimizer.load_state_dict(optimizer_state(tensors, meta, model, step, path))
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} is damaged: its optimizer state does not fit "
                        f"({str(err).splitlines()[0]})") from None


def restore_scaler(scaler: torch.amp.GradScaler, meta: dict, step: int, path) -> None:
    """fp16: the loss scale (and its growth count) of the checkpoint."""
    if not scaler.is_enabled() or step == 0:
        return
    state = meta.get("grad_scaler")
    try:
        scaler.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, AttributeError):
        raise UserError(f"checkpoint {path} is damaged: it holds no valid fp16 loss scaler "
                        "state (grad_scaler)") from None


def restore_rng(tensors: dict, meta: dict, world_size: int, device: torch.device, path) -> None:
    """The global RNG states (dropout) of the checkpoint, restored only when it was written by
    as many processes."""
    if "rng.cpu" not in tensors:
        raise UserError(f"checkpoint {path} is damaged: it holds no CPU RNG state (rng.cpu)")
    if meta.get("world_size", 1) == world_size:
        try:
            torch.set_rng_state(tensors["rng.cpu"])
            if device.type == "cuda" and "rng.cuda" in tensors:
                torch.cuda.set_rng_state(tensors["rng.cuda"], device)
        except (RuntimeError, TypeError) as err:
            raise UserError(f"checkpoint {path} is damaged: its RNG state cannot be restored "
                            f"({str(err).splitlines()[0]})") from None
