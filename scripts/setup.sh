#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (the CPU wheel where there is no GPU,
# so pip never pulls a multi-GB CUDA build), then the package and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
STAMP="$VENV/.sinkserve-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: GPU found, installing the CUDA build of torch"
        "${PIP[@]}" install torch
    else
        echo "setup: no GPU, installing the CPU build of torch"
        # torch 2.13.0 CPU lies on this kind of machine; elsewhere use PyTorch's CPU index.
        "${PIP[@]}" install torch==2.13.0 2>/dev/null \
            || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

echo "setup: installing sinkserve and its dependencies into $VENV"
"${PIP[@]}" install -e ".[test]"
echo "$want" > "$STAMP"
echo "setup: done"
