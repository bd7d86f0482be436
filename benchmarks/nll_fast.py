"""The evidence for `st nll --protocol fast`: the mean NLL over >= 256 test points against a
tight reference, per candidate solver setting, on the three models of issue 26 — the quickstart
digits, the 2-D mixture trained to convergence (6,000 steps) and a CIFAR-10-shaped DDPM++ —
with scipy's RK45 at 1e-5 in t (the paper's protocol) as the NFE baseline of the same run.

    python benchmarks/nll_fast.py --out runs/nll_fast          # trains what is missing, ~1 h CPU
    python benchmarks/nll_fast.py --out runs/nll_fast --rows   # table of the saved rows only

The models are made by `st train` (commands printed and kept in the JSON); the CIFAR-shaped
data set is a folder of smooth random 32x32 RGB images (4x4 uniform noise, bicubic upsampling),
512 for training and 256 for testing.  Every measurement is benchmarks/nll.py's (same data, one
dequantisation draw, one Rademacher probe, correction before), at one batch of --n points; the
rows go to benchmarks/results/nll_fast.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULT = HERE / "results" / "nll_fast.json"
# the candidates: t with scipy's RMS norm at loose tolerances (the aliasing of t999 nets averages
# out over many points), and the log-SNR variable with the scaled state
CANDIDATES = [("t", 1e-3, "rms"), ("t", 3e-4, "rms"), ("t", 1e-4, "rms"),
              ("lambda_scaled", 1e-3, "rms_per_part")]


def smooth_images(folder: Path, n: int, seed: int) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=32, mode="bicubic", align_corners=False)
    pixels = (fine.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, p in enumerate(pixels):
        Image.fromarray(np.ascontiguousarray(p)).save(folder / f"{i:04d}.png")


def models(out: Path, device: str = "cpu") -> dict[str, list[str]]:
    """name -> the st train command that makes it."""
    data = out / "smooth32"
    return {
        "quickstart digits": ["recipes/quickstart_digits.yaml", f"train.out_dir={out}/quickstart"],
        "2-D mixture": ["recipes/toy2d_gmm_mlp_vp_st.yaml", "train.steps=6000", "train.sample_every=0",
                        f"train.out_dir={out}/toy2d"],
        "CIFAR-shaped DDPM++": [
            "recipes/cifar10_ddpmpp_vp_nll_st.yaml",
            f"data={{name: folder, root: {data}, image_size: 32, centered: true, random_flip: true, "
            "dequantization: none}", "net.nf=16", "net.ch_mult=[1, 2, 2]", "net.num_res_blocks=1",
            "train.batch_size=32", "train.steps=300", "optim.warmup=50", "train.ema=0.99",
            "train.sample_every=0", "train.snapshot_every=0", "train.ckpt_every=300",
            f"train.device={device}", f"train.out_dir={out}/cifar_shaped"]}


def make(out: Path, only: list[str] | None = None, device: str = "cpu") -> dict[str, Path]:
    """Train the models that are missing (those named in `only`, if given)."""
    if not (out / "smooth32" / "test").is_dir():
        smooth_images(out / "smooth32" / "train", 512, 0)
        smooth_images(out / "smooth32" / "test", 256, 1)
    made = {}
    for name, args in models(out, device).items():
        if only and name not in only:
            continue
        run = Path(next(a for a in args if a.startswith("train.out_dir=")).split("=", 1)[1])
        if not (run / "ckpt.safetensors").is_file():
            subprocess.run([sys.executable, "-m", "stcli", "train", *args], check=True, cwd=ROOT)
        made[name] = run / "ckpt.safetensors"
    return made


def _key(row: dict) -> tuple:
    return row["model"], row["method"], row["variable"], row["tol"], row["norm"], row["logp_tol"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "nll_fast")
    p.add_argument("--n", type=int, default=256, help="test points (one batch)")
    p.add_argument("--ref-tol", type=float, default=1e-6)
    p.add_argument("--only", nargs="+", help="model names to measure (default: all three)")
    p.add_argument("--rows", action="store_true", help="print the table of the saved rows")
    p.add_argument("--device", default="cpu", help="cpu | cuda (training and measuring)")
    p.add_argument("--results", type=Path, default=RESULT, help="the rows' JSON file")
    p.add_argument("--candidates", type=int, default=len(CANDIDATES),
                   help="measure the first K candidates only (the first is --protocol fast)")
    p.add_argument("--setting", nargs="+", metavar="VARIABLE:TOL:NORM",
                   help="measure these settings instead (e.g. t:5e-4:rms)")
    args = p.parse_args()
    sys.path.insert(0, str(HERE))
    import nll as bench
    from machine import machine

    saved = json.loads(args.results.read_text()) if args.results.is_file() else {"rows": []}
    if args.rows:
        print(bench.table(saved["rows"]))
        return
    torch.set_num_threads(1)
    for name, ckpt in make(args.out, args.only, args.device).items():
        ns = argparse.Namespace(batch=args.n, ref_tol=args.ref_tol, device=args.device, quick=False,
                                cache=str(args.out), variables=None, norms=None, tols=None,
                                logp_tols=None)
        configs = ([(v, float(t), n) for v, t, n in (s.split(":") for s in args.setting)]
                   if args.setting else CANDIDATES[:args.candidates])
        rows = bench.bench_model(str(ckpt), ns, name, configs=configs)
        # a row measured again replaces its old one; every other row is kept
        saved = json.loads(args.results.read_text()) if args.results.is_file() else {"rows": []}
        new = {_key(r) for r in rows}
        saved["rows"] = [r for r in saved["rows"] if _key(r) not in new] + rows
        saved.setdefault("commands", {})[name] = "st train " + " ".join(models(args.out)[name])
        saved["machine"] = machine()
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(saved, indent=1) + "\n")
    print(bench.table(saved["rows"]))


if __name__ == "__main__":
    main()
