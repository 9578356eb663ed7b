#!/usr/bin/env bash
# Set up the environment, then lint, type-check and run the whole test suite (every marker).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
. .venv/bin/activate
echo "== ruff"
ruff check common dealer server_a server_b client tests examples
echo "== mypy --strict"
# mypy reads the deployment folders under their import names (secdfd.common is common/, ...)
mkdir -p build/typecheck/secdfd
for root in common dealer server_a server_b client; do
  ln -sfn "../../../$root" "build/typecheck/secdfd/$root"
done
mypy
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit $rc
