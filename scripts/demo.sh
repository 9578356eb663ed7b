#!/usr/bin/env bash
# Set up everything, start the dealer and both servers as separate local processes (embedded
# model), and detect the bundled example image through them. The last line is the verdict.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
. .venv/bin/activate
image=${1:-examples/face.png}
secdfd up
trap 'secdfd down >/dev/null 2>&1 || true' EXIT
secdfd-client detect "$image"
