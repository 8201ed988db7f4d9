#!/usr/bin/env bash
# Set up .venv (see setup.sh), then run the whole test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k sse`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/test-packages.sh
echo "test: ruff"
.venv/bin/ruff check sollol tests loadtests benchmarks
echo "test: pytest"
exec .venv/bin/python -m pytest "$@"
