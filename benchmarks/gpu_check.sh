#!/usr/bin/env bash
# One prepared device check, at most ~8 minutes on one GPU.  Run from the repository root:
#
#   bash benchmarks/gpu_check.sh                 # on a machine with a CUDA GPU
#   bash benchmarks/gpu_check.sh --cpu --quick   # the same steps, tiny sizes, on CPU (< 3 min)
#
# Steps (each time-boxed; a failed or timed-out step does not stop the others):
#   a tests       the test suite with ST_TEST_DEVICE=cuda: the tests that compare against references
#                 (closed forms, moments: tests/test_likelihood.py, tests/test_samplers.py) run on the
#                 GPU, CLI tests use --device auto, i.e. the GPU; --quick: a few of those tests
#   b train_step  benchmarks/train_step.py, DDPM++ and NCSN++ at nf 128, batch 128: fp32, the default path
#                 (TF32 + channels_last + fused Adam), TF32, channels_last, bf16, fused Adam;
#                 `compile`: torch.compile; `score_sde`, only with SCORE_SDE=<a score_sde_pytorch
#                 checkout inside the working tree> in the environment: st's step against
#                 score_sde's own (benchmarks/score_sde_reference.py), up to 60 s more
#   c nll         benchmarks/nll.py: scipy RK45 (one device->host round trip per evaluation) against
#                 st's dopri5 (paper setting and default), on the quickstart trained by step `quickstart`
#                 (--quick: a random-weight net)
#   d sample      images/s at batch 1000 for Heun-35 and Euler-Maruyama-1000
#   e stf         Stable Target Field target time and memory, B = 128, n = 4096
#   f fid         Inception-feature throughput of `st fid` with the test extractor
#   g nll_fast    `st nll --protocol fast` on the CIFAR-shaped DDPM++ of benchmarks/nll_fast.py
#                 (300 training steps, then 256 test points against dopri5 1e-6 and scipy RK45)
# Prints one table (step, status, seconds, last line) and writes gpu_check.json to $OUT
# (default ./gpu_check); every step's full log is in $OUT/<step>.log.
set -u
CPU=0; QUICK=0
for arg in "$@"; do
  case $arg in
    --cpu) CPU=1 ;;
    --quick) QUICK=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--cpu] [--quick]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-gpu_check}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
DEV=cuda; [ $CPU = 1 ] && DEV=cpu
if [ $DEV = cuda ] && ! python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device visible to torch; run with --cpu" >&2; exit 2
fi
mkdir -p "$OUT"; : >"$OUT/steps.tsv"

step() {  # step NAME LIMIT_S CMD...
  local name=$1 lim=$2; shift 2
  local t0; t0=$(date +%s.%N)
  if timeout "$lim" "$@" >"$OUT/$name.log" 2>&1; then r=OK; else r="FAIL($?)"; fi
  local dt; dt=$(python -c "import time; print(f'{time.time() - $t0:.1f}')")
  local last; last=$(grep -v '^\s*$' "$OUT/$name.log" | tail -n 1 | cut -c1-150 | tr '\t' ' ')
  printf '%s\t%s\t%s\t%s\n' "$name" "$r" "$dt" "$last" >>"$OUT/steps.tsv"
}

if [ $QUICK = 1 ]; then  # generous limits: the point is that every step runs, not its speed
  step tests 150 env ST_TEST_DEVICE=$DEV python -m pytest -q -x -p no:cacheprovider tests/test_samplers.py \
    -k "matrix_exponential or dpm2m_is_exact or ode_sampler_follows"
  step train_step 150 python benchmarks/train_step.py --nets ddpmpp ncsnpp --nf 8 --batch 2 --reps 1 \
    --skip-compile --options "fp32 eager" --device $DEV
  step nll 150 python benchmarks/nll.py --quick --batch 1 --ref-tol 1e-4 --device $DEV
  step sample 90 python benchmarks/sample.py --cases heun:2 euler_maruyama:4 --batch 4 --repeat 1 \
    --threads 1 --device $DEV
  step stf 90 python benchmarks/stf_target.py --batch 8 --n 256 --reps 2 --device $DEV
  FIDN=64
else
  step tests 110 env ST_TEST_DEVICE=$DEV python -m pytest -q -x -p no:cacheprovider
  step train_step 90 python benchmarks/train_step.py --nf 128 --batch 128 --reps 3 --skip-compile \
    --device $DEV
  if [ -n "${SCORE_SDE:-}" ]; then  # optional, outside the 8-minute budget: up to 60 s more
    step score_sde 60 python benchmarks/train_step.py --nf 128 --batch 128 --reps 3 --skip-compile \
      --options "fp32 eager" default --device $DEV --score-sde "$SCORE_SDE"
  fi
  step compile 80 python benchmarks/train_step.py --nf 128 --batch 128 --reps 3 \
    --options "fp32 eager" "torch.compile" --device $DEV
  step quickstart 45 st train recipes/quickstart_digits.yaml train.device=$DEV train.steps=1000 \
    train.sample_every=0 train.out_dir="$OUT/q"
  step nll 45 python benchmarks/nll.py --quick --batch 64 --ckpt "$OUT/q/ckpt.safetensors" --device $DEV
  step sample 40 python benchmarks/sample.py --cases heun:35 euler_maruyama:1000 --batch 1000 \
    --repeat 1 --device $DEV
  step stf 20 python benchmarks/stf_target.py --batch 128 --n 4096 --device $DEV
  step nll_fast 90 python benchmarks/nll_fast.py --out "$OUT/nll_fast" --only "CIFAR-shaped DDPM++" \
    --candidates 1 --device $DEV --results "$OUT/nll_fast.json"
  FIDN=10000
fi
python - "$OUT" $FIDN <<'PY'
import sys, numpy as np
out, n = sys.argv[1], int(sys.argv[2])
g = np.random.default_rng(0)
for k in ("a", "b"):
    np.savez(f"{out}/fid_{k}.npz", g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
PY
step fid $([ $QUICK = 1 ] && echo 90 || echo 30) st fid "$OUT/fid_a.npz" --ref "$OUT/fid_b.npz" --feature-extractor st-random-64 \
  --device $DEV --batch-size 500 --cache-dir "$OUT/cache"

python - "$OUT" "$DEV" $QUICK $FIDN <<'PY'
import json, platform, sys, time
out, dev, quick, fidn = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
import torch
name = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
rows = [dict(zip(("step", "status", "seconds", "last_line"), l.rstrip("\n").split("\t", 3)))
        for l in open(f"{out}/steps.tsv")]
for r in rows:
    r["seconds"] = float(r["seconds"])
    r["log"] = open(f"{out}/{r['step']}.log", errors="replace").read()[-20000:]
    if r["step"] == "fid" and r["status"] == "OK":
        r["last_line"] += f"  [{2 * fidn / r['seconds']:.0f} images/s end to end]"
info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name,
        "torch": torch.__version__, "quick": quick, "steps": rows}
json.dump(info, open(f"{out}/gpu_check.json", "w"), indent=1)
print(f"gpu_check on {name} ({dev}{', quick' if quick else ''}), torch {torch.__version__}, {info['date']}")
print("| step | status | s | last line |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['last_line']} |")
print(f"logs and gpu_check.json in {out}")
sys.exit(0 if all(r["status"] == "OK" for r in rows) else 1)
PY
