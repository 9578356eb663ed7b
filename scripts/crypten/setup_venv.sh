#!/usr/bin/env bash
# The side-by-side reference: CrypTen 0.4.1 in a venv of its own (build/crypten/venv), on the CPU
# torch 2.13.0 wheel, without torchvision (no CPU build; CrypTen itself never imports it), and onnx
# for the exporter in build/crypten/export_deps (used through PYTHONPATH, so the project's .venv is
# left as it is). Then: scripts/crypten/export_onnx.py and scripts/crypten/run.py (see run.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${VENV:-build/crypten/venv}
DEPS=${DEPS:-build/crypten/export_deps}
python3 -m venv "$VENV"
"$VENV/bin/pip" install torch==2.13.0             # the CPU wheel, first
"$VENV/bin/pip" install crypten==0.4.1 --no-deps  # its metadata asks for torchvision and sklearn
"$VENV/bin/pip" install omegaconf==2.4.0 onnx==1.23.2 pandas==3.1.1 pyyaml==6.0.4 scipy==1.17.1 future==1.0.0
"$VENV/bin/pip" install --no-deps --target "$DEPS" onnx==1.23.2 protobuf==7.36.2 ml_dtypes==0.6.0
"$VENV/bin/pip" check || true  # expected to name sklearn, tensorboard and torchvision, left out on purpose
