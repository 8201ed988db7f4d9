#!/usr/bin/env bash
# Set up .venv (see setup.sh), then run `sollol demo`: two llama-server nodes
# on a generated tiny model, with the router in front on 127.0.0.1:8000.
# Extra arguments go to `sollol demo`, e.g. `bash scripts/demo.sh --port 9000`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/sollol demo "$@"
