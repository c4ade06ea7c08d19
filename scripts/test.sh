#!/usr/bin/env bash
# Set up ./.venv and run the test suite offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
HF_HUB_OFFLINE=1 exec .venv/bin/python -m pytest tests -q "$@"
