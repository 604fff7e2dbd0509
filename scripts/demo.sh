#!/usr/bin/env bash
# The README's main job: generation, then prune -> serve -> load -> A/B report (scripts/demo.py).
# Arguments pass through, e.g. `bash scripts/demo.sh --model /models/LLaDA-8B-Instruct --device cuda`.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_AUTH_MODE=disabled
.venv/bin/python -m sinkprune generate --model "${MODEL:-embedded}" --prompt "The function returns" \
    --steps 32 --gen-length 32 --block-length 16
.venv/bin/python scripts/demo.py "$@"
