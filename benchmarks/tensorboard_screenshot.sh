#!/usr/bin/env bash
# Screenshots of TensorBoard's own UI for a run, headless (docs/img/tensorboard_ui_*.png).
# Needs a Chromium binary (Debian: `apt-get install chromium`) and the `tensorboard` package.
#   bash benchmarks/tensorboard_screenshot.sh LOGDIR [OUTDIR]
set -euo pipefail
logdir=${1:?usage: tensorboard_screenshot.sh LOGDIR [OUTDIR]}
out=${2:-docs/img}
port=${PORT:-6006}
tensorboard --logdir "$logdir" --port "$port" >/dev/null 2>&1 &
tb=$!
trap 'kill $tb' EXIT
sleep 10
shot() {  # shot FILE FRAGMENT WIDTH,HEIGHT
    chromium --headless --no-sandbox --use-gl=swiftshader --enable-unsafe-swiftshader --hide-scrollbars \
        --window-size="$3" --virtual-time-budget=25000 --screenshot="$1" \
        "http://localhost:$port/#$2" >/dev/null 2>&1
}
shot "$out/tensorboard_ui_scalars.png" "scalars&tagFilter=loss%7Cgrad_norm%24%7Ctau_q50%7Clr%7Cimages_per_s" 1600,1100
shot "$out/tensorboard_ui_images.png" images 1000,700
