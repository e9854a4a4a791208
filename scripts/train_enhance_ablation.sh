#!/usr/bin/env bash
# Train the MAGE-Net ablation on a CPU and evaluate it (docs/enhance_eval/).
#
#   scripts/train_enhance_ablation.sh [RUNS_DIR]        (default runs/enhance_ablation)
#
# Runs: RSP pretraining; Stage-1 only; MAGE-Net without RSP; MAGE-Net; T-MAGE-Net (the last two start
# their RSP module from the pretrained one); MAGE-Net with STEPS_LONG steps (outside the ablation,
# to see what longer training buys); then the evaluation, which writes
# docs/enhance_eval/{ablation.md,ablation.json,examples.png} and copies the best of the MAGE-Net /
# T-MAGE-Net runs on the held-out real half to retina_fast/weights/magenet-tiny/.
# A finished run (RUN/final/config.json) is skipped and an interrupted one resumed, so the script can be
# re-run after a stop. Every job runs under `nice -n 15` with one thread (OMP_NUM_THREADS=1): this is
# a shared 2-core machine and other training has priority. After the RSP pretraining, the long MAGE-Net
# run goes beside the four ablation runs (two single-threaded jobs at a time; PARALLEL=0 runs
# everything in sequence). Scaled down for a CPU: tiny preset, 128² crops of 256-px fundus images, batch 4 labelled
# (+ 2 unlabelled real for T-MAGE-Net) instead of the paper's 16 + 8, a few hundred steps; EMA
# α = 0.99 instead of 0.999 because the runs are short.
set -euo pipefail

RUNS=${1:-runs/enhance_ablation}
PY=${PYTHON:-python}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
NICE="nice -n 15"
TRAIN="$NICE $PY -m retina_fast.training.train_enhance"   # == retina-fast train rsp|magenet|tmagenet
COMMON="--size 256 --crop 128 --batch-size 4 --eyes 48 --per-eye 4 --threads 1 --no-progress --data-cache $RUNS/data"
STEPS_RSP=${STEPS_RSP:-500}
STEPS=${STEPS:-600}
STEPS_LONG=${STEPS_LONG:-2000}
# Recipe options of docs/enhance_eval/no_harm_study.md, off by default (the ladder of docs/enhance_eval/ablation.md):
# IDENTITY_FRACTION=0.25 (identity pairs), REAL_PAIRS=48 (labelled real pairs), REAL_AUGMENT=0.2 (T-MAGE-Net's
# widened unlabelled real domain), STRUCTURE_WEIGHT=0.2 (vessel-preservation term through a second, frozen RSP
# network trained with seed 1, $RUNS/rsp-s1). The shipped weights' recipe, as a ladder at equal steps:
#   IDENTITY_FRACTION=0.25 REAL_PAIRS=48 STRUCTURE_WEIGHT=0.2 STEPS=3000 STEPS_LONG=0 scripts/train_enhance_ablation.sh
# RECIPE="..." adds trainer options to every rung (the shipped weights since 2026-12-06: RECIPE="--pixel-loss l2
# --charbonnier-from 0.5 --spot-fraction 0.5").
# A finished run found in RUNS_DIR is reused (e.g. a link to a run trained earlier with the same options).
# EVAL=0 trains only and leaves docs/enhance_eval and the shipped weights alone.
IDENT="--identity-fraction ${IDENTITY_FRACTION:-0} --real-pairs ${REAL_PAIRS:-0} ${RECIPE:-}"
STRUCTURE_WEIGHT=${STRUCTURE_WEIGHT:-0}
AUG="--real-augment ${REAL_AUGMENT:-0}"
PARALLEL=${PARALLEL:-1}
EVAL=${EVAL:-1}  # EVAL=0: train only (the evaluation below writes docs/enhance_eval and the shipped weights)
mkdir -p "$RUNS"
WALL="$RUNS/walltimes.txt"

train() {  # name kind extra-args...
  local name=$1 kind=$2; shift 2
  local out="$RUNS/$name"
  if [[ -f "$out/final/config.json" ]]; then
    echo "skip $name (finished)"; return
  fi
  local resume=""
  [[ -f "$out/checkpoints/latest" ]] && resume="--resume"
  local t0=$(date +%s)
  echo "train $name ($kind) $(date -u +%FT%TZ), load: $(cut -d' ' -f1-3 /proc/loadavg)"
  $TRAIN "$kind" --out "$out" $COMMON "$@" $resume > "$RUNS/$name.stdout" 2>&1
  echo "$name $(( $(date +%s) - t0 )) s (this invocation; total in $out/final/config.json)" | tee -a "$WALL"
}

train rsp         rsp      --steps "$STEPS_RSP" --lr 2e-3
if [[ "$STRUCTURE_WEIGHT" != 0 ]]; then
  train rsp-s1    rsp      --steps "$STEPS_RSP" --lr 2e-3 --seed 1
  IDENT="$IDENT --structure-weight $STRUCTURE_WEIGHT --structure-rsp $RUNS/rsp-s1/final"
fi
long_run() {  # MAGE-Net trained longer (not part of the ablation ladder; STEPS_LONG=0 skips it)
  [[ "$STEPS_LONG" -gt 0 ]] && train magenet-long magenet --steps "$STEPS_LONG" --rsp-init "$RUNS/rsp/final" $IDENT
  return 0
}
pid=""
if [[ "$PARALLEL" == 1 ]]; then long_run & pid=$!; fi
if [[ "$PARALLEL" == 1 && "$STEPS_LONG" -le 0 ]]; then  # no long run: the two halves of the ladder side by side
  # (one thread each, 3000 steps: w/o RSP 55 min + Stage-1 31 min beside MAGE-Net, then T-MAGE-Net 95 min)
  { train no-rsp  magenet --steps "$STEPS" --no-rsp $IDENT
    train stage1-only magenet --steps "$STEPS" --stage1-only $IDENT
    train tmagenet tmagenet --steps "$STEPS" --rsp-init "$RUNS/rsp/final" --unlabelled-batch-size 2 $IDENT $AUG \
      --real-images 48 --ema 0.99 --warmup 0.3 --consistency-weight 1.0 --noise-std 0.05; } & pid=$!
  train magenet magenet --steps "$STEPS" --rsp-init "$RUNS/rsp/final" $IDENT
else
  train stage1-only magenet  --steps "$STEPS" --stage1-only $IDENT
  train no-rsp      magenet  --steps "$STEPS" --no-rsp $IDENT
  train magenet     magenet  --steps "$STEPS" --rsp-init "$RUNS/rsp/final" $IDENT
  train tmagenet    tmagenet --steps "$STEPS" --rsp-init "$RUNS/rsp/final" --unlabelled-batch-size 2 $IDENT $AUG \
                             --real-images 48 --ema 0.99 --warmup 0.3 --consistency-weight 1.0 --noise-std 0.05
fi
if [[ -n "$pid" ]]; then wait "$pid"; else long_run; fi
[[ "$EVAL" == 1 ]] || exit 0

t0=$(date +%s)
$NICE $PY -m retina_fast.training.eval_enhance --runs "$RUNS" --out docs/enhance_eval \
    --ship-to retina_fast/weights/magenet-tiny
echo "eval $(( $(date +%s) - t0 )) s" | tee -a "$WALL"
