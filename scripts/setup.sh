#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (the CPU wheel where there is no GPU,
# so pip never pulls a multi-GB CUDA build), then the package and its extras.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=${PYTHON:-python3}
STAMP="$VENV/.sinkserve-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

# The end-to-end tests and the demo scrape metrics with a real Prometheus server (Debian package).
if ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing prometheus (Debian package)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
        echo "setup: warning: no prometheus binary; install it (apt-get install prometheus) for the end-to-end tests"
    fi
fi

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
# (pip's notes about this machine's missing local index folders are filtered out; its exit code is kept)
"${PIP[@]}" install -e ".[test]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
echo "$want" > "$STAMP"
echo "setup: done"
