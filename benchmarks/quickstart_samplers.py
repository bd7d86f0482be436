"""Which sampler suits an under-trained model: FID (digit classifier of benchmarks/repro) of the
quickstart checkpoint under stochastic and probability-flow samplers (docs/sampling.md).

    st train recipes/quickstart_digits.yaml                     # runs/quickstart_digits
    python benchmarks/quickstart_samplers.py runs/quickstart_digits/ckpt.safetensors

Needs the digit classifier of the reproduction (runs/repro/classifier, made by
`python benchmarks/repro/run.py --quick` or any digits run).  Writes
benchmarks/results/quickstart_samplers.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "repro"))

SETTINGS = [("euler_maruyama", {"steps": 50}), ("euler_maruyama", {"steps": 250}),
            ("heun", {"steps": 18}), ("dpm2m", {"steps": 20})]


def main() -> None:
    import digits_fid as dfid

    from stcli import load, sample

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("-n", type=int, default=500)
    p.add_argument("--classifier", type=Path, default=ROOT / "runs/repro/classifier/digits_cnn.safetensors")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quickstart_samplers.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = load(args.ckpt)
    ext = dfid.extractor(args.classifier)
    ref = dfid.features(dfid.digit_split("train")[0], ext)
    rows = []
    for name, options in SETTINGS:
        feats = dfid.features(sample(model, n=args.n, sampler=name, seed=0, **options), ext)
        rows.append({"sampler": name, **options, "fid": dfid.fid(feats, ref),
                     "fid_se": dfid.fid_bootstrap_se(feats, ref, 100)})
        print(f"{name} {options}: FID {rows[-1]['fid']:.1f} ± {rows[-1]['fid_se']:.1f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"checkpoint": str(args.ckpt), "step": model.step, "n": args.n,
                                    "seed": 0, "date": datetime.date.today().isoformat(),
                                    "machine": platform.processor() or platform.machine(),
                                    "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
