#!/usr/bin/env bash
# Train the diffusion stage of the shipped `tiny` longer, on a GPU, time-boxed and resumable:
#
#   bash scripts/train_tiny_ldm_gpu.sh RUN SECONDS [DEVICE [OPTION ...]]  # DEVICE: cuda (default) or cpu (a smoke test)
#
# OPTIONs after DEVICE go to `retina-fast train ldm` after the recipe's own, so they override it (one factor at a
# time on top of the recipe, e.g. `... RUN 600 cuda --vessel-weight 10`); a resumed run must be given the same.
#
# The recipe is scripts/train_tiny.sh's LDM stage on the shipped VQ-GAN (retina_fast/weights/tiny, unchanged),
# with what a GPU makes cheap: batch 256 instead of 32 (a tiny U-Net step is launch-bound on a GPU, so 8x
# the images per step costs little) and 4096 phantom eyes (0..4095; the evaluation's held-out eyes start at
# 6000, 100000 and 200000) instead of 1024, so that many more steps do not mean many more passes over the
# same eyes. The learning rate stays at the shipped 8e-4.
#
# The run stops after SECONDS (wall clock, data rendering included) and leaves RUN/final/ written from its
# last checkpoint (every 250 steps); run it again with the same RUN to continue. RUN/final/ is a complete
# model directory: `retina-fast sample --model RUN/final`, or copy it over retina_fast/weights/tiny/.
set -euo pipefail
run=$(realpath -m "${1:?usage: train_tiny_ldm_gpu.sh RUN SECONDS [DEVICE [OPTION ...]]}")  # before the cd below
secs=${2:?usage: train_tiny_ldm_gpu.sh RUN SECONDS [DEVICE [OPTION ...]]}
device=${3:-cuda}
extra=("${@:4}")
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
common=(--preset tiny --data phantom --vqgan retina_fast/weights/tiny --out "$run" --steps "${STEPS:-100000}"
        --batch-size "${BATCH:-256}" --lr 8e-4 --num-images "${EYES:-4096}" --num-workers "${WORKERS:-8}" --amp bf16
        --latent-quantile 0 --latent-asinh 1 --latent-clip on --loss l2-balanced --vessel-weight 5
        --sample-every 0 --ckpt-every "${CKPT:-250}"
        --log-every 50 --device "$device" "${extra[@]}")
resume=()
[ -f "$run/checkpoints/latest" ] && resume=(--resume)
# SIGTERM at the deadline: checkpoints are written atomically, so the newest complete one survives
rc=0
timeout --signal=TERM --kill-after=10 "$secs" "$py" -m retina_fast train ldm "${common[@]}" "${resume[@]}" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ]; then
  echo "train_tiny_ldm_gpu: training failed (exit $rc)" >&2
  exit "$rc"
fi
[ -f "$run/checkpoints/latest" ] || { echo "train_tiny_ldm_gpu: no checkpoint within $secs s" >&2; exit 1; }
last=$(sed 's/^step_0*//' "$run/checkpoints/latest")
# A resumed run whose --steps equals its checkpoint's step trains nothing and writes final/ (EMA weights)
if [ ! -f "$run/final/config.json" ] || [ "$rc" -eq 124 ]; then
  rm -rf "$run/final"
  "$py" -m retina_fast train ldm "${common[@]}" --resume --steps "$last" >/dev/null  # the last --steps wins
fi
echo "train_tiny_ldm_gpu: $run/final at step $last"
