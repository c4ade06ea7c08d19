#!/usr/bin/env bash
# The offline demo: set up ./.venv, generate PeXR-mini, train a small PedCLIP on the CPU, evaluate on the test split.
# Results: outputs/pedclip-demo/eval_results.json (a Hub-ready model folder around it). Extra flags go to the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_accelerate.py "$@"
