#!/usr/bin/env bash
# Train the small LDM grid of the speed/quality Pareto study, then run the study (docs/pareto/).
#
#   bash scripts/train_pareto_grid.sh [RUNS_DIR]          (default runs/pareto)
#
# Grid: U-Net base 16, 32 and 48 on top of the shipped VQ-GAN, 2000 steps each (the shipped default model,
# base 32 with 4500 steps, is a fourth point, b32). Each run is the shipped LDM recipe except the U-Net
# width and the step count:
#
#   retina-fast train ldm --preset tiny --data phantom --vqgan retina_fast/weights/tiny \
#     --out runs/pareto/ldm-b16 --config-json '{"unet": {"base_channels": 16}}' \
#     --steps 2000 --batch-size 32 --lr 8e-4 --num-images 1024 --amp bf16 --latent-quantile 0 --latent-asinh 1 \
#     --latent-clip on --loss l2-balanced --vessel-weight 5
#
# --vqgan takes a VQ-GAN run directory or any checkpoint directory holding vqgan.safetensors; the
# packaged model directory retina_fast/weights/tiny is one, so every grid model shares the VQ-GAN of
# the shipped default (whatever is shipped when this runs) and only the U-Net differs between the
# points. Use VQGAN=runs/tiny-vqgan to train on a VQ-GAN run instead (then b32=default no longer
# shares it; pareto.py notes that). Training data: phantom eyes 0..1023 at 128 px, like the shipped LDM.
# The grid's base-32 run is labelled b32g; it differs from the shipped b32 only in its step count.
#
# A finished run (RUN/final/config.json) is skipped and an interrupted one resumed, so the script can
# be re-run after a stop. Knobs (environment): STEPS, AMP (bf16|off), BASES, NUM_IMAGES, VQGAN, NICE
# (default "nice -n 15"), PYTHON, PARETO=0 (train only), PARETO_ARGS (extra pareto.py arguments; the committed figure used "--n 256").
# Threads: torch's default (all cores) unless OMP_NUM_THREADS is set.
set -euo pipefail

RUNS=${1:-runs/pareto}
PY=${PYTHON:-python}
NICE=${NICE:-nice -n 15}
STEPS=${STEPS:-2000}
AMP=${AMP:-bf16}
BASES=${BASES:-16 32 48}
NUM_IMAGES=${NUM_IMAGES:-1024}
VQGAN=${VQGAN:-retina_fast/weights/tiny}
PARETO=${PARETO:-1}
mkdir -p "$RUNS"

for b in $BASES; do
  out="$RUNS/ldm-b$b"
  if [[ -f "$out/final/config.json" ]]; then
    echo "skip $out (finished)"; continue
  fi
  resume=""
  [[ -f "$out/checkpoints/latest" ]] && resume="--resume"
  t0=$(date +%s)
  echo "train $out $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg), log: $out.log"
  $NICE $PY -m retina_fast.cli train ldm --preset tiny --data phantom --vqgan "$VQGAN" --out "$out" \
    --config-json "{\"unet\": {\"base_channels\": $b}}" \
    --steps "$STEPS" --batch-size 32 --lr 8e-4 --num-images "$NUM_IMAGES" --amp "$AMP" --latent-quantile 0 --latent-asinh 1 \
    --latent-clip on --loss l2-balanced --vessel-weight 5 $resume \
    > "$out.log" 2>&1 || { tail -c 2000 "$out.log"; exit 1; }
  echo "$out $(( $(date +%s) - t0 )) s" | tee -a "$RUNS/walltimes.txt"
done

if [[ "$PARETO" == 1 ]]; then
  # Models in order of U-Net width; b32 = the shipped default (a grid-trained base 32 is b32g).
  models=()
  for b in $(printf '%s\n' $BASES 32 | sort -n -u); do
    if [[ "$b" == 32 ]]; then models+=("b32=default"); fi
    if [[ " $BASES " == *" $b "* ]]; then
      if [[ "$b" == 32 ]]; then models+=("b32g=$RUNS/ldm-b32/final"); else models+=("b$b=$RUNS/ldm-b$b/final"); fi
    fi
  done
  $NICE $PY benchmarks/pareto.py --models "${models[@]}" ${PARETO_ARGS:-}
fi
