"""The Python API for notebooks: ``load`` a checkpoint, ``sample`` images as a uint8 tensor.

    from stcli import load, sample
    model = load("ckpt.safetensors")                 # EMA weights, on the CPU
    x = sample(model, n=64, sampler="heun", steps=18, seed=0)   # uint8 (64, C, H, W)

Nothing is written to disk.  Image i depends only on (seed, i), exactly as in ``st sample``:
``sample(model, n, seed=s)[i]`` is the PNG ``st sample CKPT -n n --seed s`` writes for index i
(with the same sampler settings).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stcli.components.loading import Loaded, load_model
from stcli.infra.distributed import Context, pick_device
from stcli.infra.errors import UserError
from stcli.jobs.sample import Job, resolve_sampler


def load(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> Loaded:
    """The checkpoint's model (``.model``, a ScoreModel in eval mode), recipe and step."""
    if weights not in ("ema", "raw"):
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}")
    device = str(device)  # mps (Apple) as torch takes it; auto, cpu and cuda checked
    chosen = torch.device(device) if device.startswith("mps") else pick_device(device)
    return load_model(path, weights, chosen)


def sample(model: Loaded, n: int, sampler: str | None = None, steps: int | None = None,
           seed: int = 0, batch_size: int = 256, **options) -> torch.Tensor:
    """n samples of ``model`` as uint8 images (n, C, H, W) (float32 (n, ...) for non-image data).

    ``sampler`` (pc, euler_maruyama, ode, euler, heun, dpm2m, unipc; any registered one),
    ``steps`` and the other ``options`` (e.g. ``schedule="edm"``, ``snr=0.16``, ``rtol=1e-3``)
    override the recipe's ``sample`` section; another sampler than the recipe's starts from its
    own defaults.
    """
    for name, value in (("n", n), ("batch_size", batch_size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UserError(f"{name} must be a whole number, got {value!r}")
    if n <= 0 or batch_size <= 0:
        raise UserError(f"n and batch_size must be positive, got n={n}, batch_size={batch_size}")
    overrides = {k: v for k, v in {"name": sampler, "steps": steps, **options}.items()
                 if v is not None}
    spec = resolve_sampler(model.recipe.sample, overrides)
    spec.check(model.recipe.sde)
    device = next(model.model.parameters()).device
    job = Job(model, spec, Context(0, 1, device), Path("."), n, batch_size, seed, "npz", "fp32")
    parts = []
    with torch.no_grad():
        for lo in range(0, n, batch_size):
            x, _ = job.sample(list(range(lo, min(n, lo + batch_size))))
            parts.append(model.recipe.data.to_uint8(x).cpu() if job.images else x.float().cpu())
    return torch.cat(parts)
