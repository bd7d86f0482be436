"""`st export CKPT --out model.safetensors`: inference-only weights plus the recipe.

A training checkpoint holds the model, its EMA and Adam's two moments (16 bytes per parameter
in float32) and the RNG states.  An export keeps one set of weights (``ema`` or ``raw``) in
float32, float16 or bfloat16, the recipe and the step: a quarter (fp32) or an eighth (fp16,
bf16) of the training checkpoint.  Only the parameters are cast: buffers such as the fixed
Fourier frequencies stay float32 (a rounded frequency of scale 16 would move every feature).
``st sample``, ``st nll``, ``st fid``, ``st diagnose`` and ``stcli.load`` read an export as any
checkpoint; the weights are computed in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stcli.components.loading import model_from_state, open_checkpoint
from stcli.infra import checkpoint
from stcli.infra.errors import UserError
from stcli.infra.outputs import output_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SECTIONS = {"ema": "ema", "raw": "model"}


def export(ckpt: str | Path, out: str | Path, weights: str = "ema", dtype: str = "fp32",
           overwrite: bool = False) -> dict:
    """Write the ``weights`` of ``ckpt`` as ``dtype`` with its recipe to ``out`` (an existing
    file only with ``overwrite``; never the checkpoint itself)."""
    if weights not in SECTIONS:
        raise UserError(f"--weights must be one of {', '.join(SECTIONS)}, got {weights!r}")
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = output_file(out, "--out", overwrite=overwrite, inputs=[ckpt])
    opened = open_checkpoint(ckpt)
    tensors, meta = opened.tensors, opened.meta
    section = SECTIONS[weights]
    state = checkpoint.section(section, tensors)
    if not state:
        raise UserError(f"checkpoint {ckpt} holds no {weights} weights")
    # checked as st sample checks it (every name and shape), then the trainable ones cast
    model = model_from_state(opened.recipe, dict(state), ckpt, weights)
    params = {name for name, _ in model.named_parameters()}
    cast = {k: v.to(DTYPES[dtype]) if k in params else v for k, v in state.items()}
    checkpoint.save(out, checkpoint.prefixed(section, cast),
                    {"recipe": meta["recipe"], "step": meta.get("step", 0),
                     "export": {"weights": weights, "dtype": dtype, "source": str(ckpt)}})
    return {"tensors": len(cast), "bytes": out.stat().st_size,
            "source_bytes": Path(ckpt).stat().st_size}
