#!/usr/bin/env bash
# Run a dndtrain command after making sure the environment is set up (a no-op when it already is).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m dndtrain "$@"
