#!/usr/bin/env bash
# Secure vs plaintext fused fake probabilities on the proxy validation split (>= 50 images),
# through dealer and servers as separate processes. Makes the proxy set first if it is missing
# (the one the embedded model was trained on: `secdfd data synth --count 4000 --seed 1`).
# Usage: bash scripts/fidelity.sh [IMAGES]   (exit status 1 if the bar is not met)
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
data=${SECDFD_PROXY:-runs/proxy}
if [[ ! -d "$data/real" ]]; then
  secdfd data synth --out "$data" --count 4000 --seed 1
fi
secdfd bench fidelity --data "$data" --split val --images "${1:-50}"
