#!/usr/bin/env bash
# Train the shipped default model `tiny` on the phantom and install it as retina_fast/weights/tiny.
# About 2 hours on an idle 2-core AVX512-BF16 CPU (VQ-GAN ~0.45 s/step, ~0.6 s/step once the GAN starts at
# step 1000; LDM ~0.7 s/step on 32x32 latents), bf16 autocast on both; much faster on a GPU.
# Resumable: run it again after an interruption and each stage continues from its last checkpoint
# (every 250 / 500 steps); a finished stage is not trained again.
# The recipe and the study behind it: docs/recipe_study/README.md.
set -euo pipefail
out=${1:-runs}
resume() { [ -f "$1/checkpoints/latest" ] && echo --resume || true; }
if [ ! -f "$out/tiny-vqgan/final/config.json" ]; then
  retina-fast train vqgan --preset tiny --data phantom --out "$out/tiny-vqgan" $(resume "$out/tiny-vqgan") \
    --steps 5000 --batch-size 8 --lr 1e-3 --num-images 1024 --num-workers 2 --amp bf16 --normalise band --kmeans-images 64 \
    --sample-every 500 --ckpt-every 250
fi
if [ ! -f "$out/tiny-ldm/final/config.json" ]; then
  retina-fast train ldm --preset tiny --data phantom --vqgan "$out/tiny-vqgan" --out "$out/tiny-ldm" \
    $(resume "$out/tiny-ldm") --steps 4500 --batch-size 32 --lr 8e-4 --num-images 1024 --amp bf16 --latent-quantile 0 --latent-asinh 1 --latent-clip on \
    --loss l2-balanced --vessel-weight 5 --sample-every 500
fi
mkdir -p retina_fast/weights/tiny
rm -f retina_fast/weights/tiny/*.safetensors retina_fast/weights/tiny/config.json
cp "$out/tiny-ldm/final/"* retina_fast/weights/tiny/
cp "$out/tiny-vqgan/log.csv" retina_fast/weights/tiny/train_log_vqgan.csv
cp "$out/tiny-ldm/log.csv" retina_fast/weights/tiny/train_log_ldm.csv
