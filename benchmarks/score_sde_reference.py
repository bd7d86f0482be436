"""score_sde's own training step, the reference row of ``benchmarks/train_step.py --score-sde``.

Nothing of score_sde is kept in this repository: the step is built from a local checkout of
score_sde_pytorch given by path, from its own CIFAR-10 configs (``configs/vp/
cifar10_ddpmpp_continuous.py`` for DDPM++, ``configs/ve/cifar10_ncsnpp_continuous.py`` for
NCSN++, with ``model.nf`` set to the width measured), its registered model class,
``losses.get_step_fn`` (its loss, warm-up, gradient clipping and ``torch.optim.Adam``) and
``models.ema.ExponentialMovingAverage``, i.e. one iteration of its ``run_lib.train`` loop on one
device. ``create_model`` is not called: its ``DataParallel`` spans every visible GPU (and moves a
CPU model to the first), so the model is wrapped for the measured device only, as score_sde runs
on a one-GPU machine. On CUDA the step runs at torch's default fp32 precision, what score_sde
runs (this torch: IEEE matmuls, TF32 convolutions): the flags as they were when this module was
imported are put back on every call, since st's rows set their own.

Two shims let it import without network or a CUDA toolkit:

- ``op.upfirdn2d``: score_sde's ``op`` package compiles a CUDA extension when imported. Its CPU
  path is a native PyTorch upfirdn2d that folds the channels into the batch and runs a
  single-channel convolution; the shim does the same (only NCSN++'s FIR resampling calls it).
  On a GPU the shim stands in for score_sde's CUDA kernel, so NCSN++'s score_sde row there
  times that substitute, not the kernel.
- ``ml_collections.ConfigDict`` as an attribute namespace, only when ml_collections is not
  installed (the configs use nothing else of it).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

CONFIGS = {"ddpmpp": "configs.vp.cifar10_ddpmpp_continuous",
           "ncsnpp": "configs.ve.cifar10_ncsnpp_continuous"}
TORCH_PRECISION = (torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad (negative crops), convolve with ``kernel``, keep every
    ``down``-th sample; the same padding on both axes, channels folded into the batch."""
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    if up > 1:
        z = y.new_zeros(n * c, 1, h * up, w * up)
        z[..., ::up, ::up] = y
        y = z
    y = F.pad(y, [pad[0], pad[1], pad[0], pad[1]])
    weight = torch.flip(kernel, [0, 1]).to(y)[None, None]  # a true convolution, not correlation
    y = F.conv2d(y, weight)[..., ::down, ::down]
    return y.reshape(n, c, y.shape[-2], y.shape[-1])


class _ConfigDict(types.SimpleNamespace):
    """The part of ml_collections.ConfigDict that score_sde's config files use."""


def _install_shims() -> None:
    op = types.ModuleType("op")
    op.upfirdn2d = upfirdn2d
    sys.modules["op"] = op
    if importlib.util.find_spec("ml_collections") is None:
        sys.modules["ml_collections"] = types.ModuleType("ml_collections")
        sys.modules["ml_collections"].ConfigDict = _ConfigDict


def load(repo: str | Path) -> types.SimpleNamespace:
    """score_sde's modules from a checkout at ``repo``; ValueError if it is none."""
    root = Path(repo).resolve()
    if not root.is_dir():
        raise ValueError(f"{repo}: no such folder")
    if not (root / "models" / "ncsnpp.py").is_file():
        raise ValueError(f"{repo}: not a score_sde_pytorch checkout (no models/ncsnpp.py)")
    _install_shims()
    sys.path.insert(0, str(root))
    names = ("losses", "sde_lib", "models.utils", "models.ema", "models.ncsnpp", *CONFIGS.values())
    return types.SimpleNamespace(**{n.replace(".", "_"): importlib.import_module(n) for n in names})


class ScoreSdeStep:
    """One training iteration of score_sde's loop on a fresh model; same interface as ``Step``."""

    def __init__(self, sde_code: types.SimpleNamespace, name: str, nf: int, batch: int,
                 device: torch.device):
        torch.manual_seed(0)
        config = getattr(sde_code, CONFIGS[name].replace(".", "_")).get_config()
        config.model.nf, config.device = nf, device
        net = sde_code.models_utils.get_model(config.model.name)(config).to(device)
        self.model = (torch.nn.DataParallel(net, device_ids=[device]) if device.type == "cuda"
                      else net).train()
        self.device = device
        sde_lib, losses = sde_code.sde_lib, sde_code.losses
        sde = (sde_lib.VPSDE(config.model.beta_min, config.model.beta_max, config.model.num_scales)
               if config.training.sde == "vpsde" else
               sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max, config.model.num_scales))
        self.state = dict(model=self.model, step=0,
                          optimizer=losses.get_optimizer(config, self.model.parameters()),
                          ema=sde_code.models_ema.ExponentialMovingAverage(
                              self.model.parameters(), decay=config.model.ema_rate))
        self.step_fn = losses.get_step_fn(
            sde, train=True, optimize_fn=losses.optimization_manager(config),
            reduce_mean=config.training.reduce_mean, continuous=config.training.continuous,
            likelihood_weighting=config.training.likelihood_weighting)
        self.x0 = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1

    def __call__(self) -> None:
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = \
                TORCH_PRECISION
        self.step_fn(self.state, self.x0)
