#!/usr/bin/env bash
# Trains the default GAN and VAE on MNIST and copies their final sample grids to docs/,
# timing each run: the pictures and times in the README come from this script.
#   GENTRAIN_DATA=/path/with/MNIST scripts/readme_grids.sh [STEPS] [extra overrides...]
# (from a checkout without installing: PYTHONPATH=src scripts/readme_grids.sh ...)
set -euo pipefail
steps=${1:-3000}; shift || true
out=${OUT_DIR:-runs/readme}
mkdir -p docs "$out"
for family in gan vae; do
  start=$(date +%s)
  python3 -m gentrain model=$family dataset=mnist trainer.steps=$steps "$@" hydra.run.dir="$out/$family"
  echo "$family: $steps steps in $(( $(date +%s) - start )) s (wall clock, start-up included)" | tee -a "$out/times.txt"
  cp "$out/$family/samples/step_$(printf %07d "$steps").png" "docs/${family}_mnist.png"
done
