#!/usr/bin/env bash
# Train the shipped default model `tiny` on the phantom and install it as retina_fast/weights/tiny.
# About an hour on an idle 2-core AVX512-BF16 CPU (VQ-GAN ~0.35 s/step before the GAN starts at step
# 1000, ~0.5 s/step after; LDM ~0.1 s/step), bf16 autocast on both; much faster on a GPU.
set -euo pipefail
out=${1:-runs}
retina-fast train vqgan --preset tiny --data phantom --out "$out/tiny-vqgan" \
  --steps 6000 --batch-size 8 --lr 3e-4 --num-images 1024 --num-workers 2 --amp bf16 --band-weights std
retina-fast train ldm --preset tiny --data phantom --vqgan "$out/tiny-vqgan" --out "$out/tiny-ldm" \
  --steps 6000 --batch-size 32 --lr 2e-4 --num-images 1024 --amp bf16
mkdir -p retina_fast/weights/tiny
cp "$out/tiny-ldm/final/"* retina_fast/weights/tiny/
cp "$out/tiny-vqgan/log.csv" retina_fast/weights/tiny/train_log_vqgan.csv
cp "$out/tiny-ldm/log.csv" retina_fast/weights/tiny/train_log_ldm.csv
