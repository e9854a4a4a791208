#!/usr/bin/env bash
# Train the shipped default model `tiny` on the phantom and install it as retina_fast/weights/tiny.
# ~30 min on an idle 2-core CPU (VQ-GAN ~1.3 s/step, LDM ~0.18 s/step); faster on a GPU.
set -euo pipefail
out=${1:-runs}
retina-fast train vqgan --preset tiny --data phantom --out "$out/tiny-vqgan" \
  --steps 800 --batch-size 8 --lr 3e-4 --num-images 512 --num-workers 2
retina-fast train ldm --preset tiny --data phantom --vqgan "$out/tiny-vqgan" --out "$out/tiny-ldm" \
  --steps 2000 --batch-size 32 --lr 2e-4 --num-images 1024
mkdir -p retina_fast/weights/tiny
cp "$out/tiny-ldm/final/"* retina_fast/weights/tiny/
cp "$out/tiny-vqgan/log.csv" retina_fast/weights/tiny/train_log_vqgan.csv
cp "$out/tiny-ldm/log.csv" retina_fast/weights/tiny/train_log_ldm.csv
