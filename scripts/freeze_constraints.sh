#!/usr/bin/env bash
# Writes requirements/constraints.txt, the exact versions scripts/setup.sh installs, from a venv the
# whole suite has just passed in (default .venv-latest, as `make test-latest` leaves it):
#
#   make test-latest && bash scripts/freeze_constraints.sh && make test && git add requirements/constraints.txt
#
# torch and the packages that come only with its CUDA build (nvidia-*, cuda-*) are left out:
# scripts/setup.sh chooses the torch build (CPU where there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-latest}
OUT=requirements/constraints.txt
[ -x "$VENV/bin/python" ] || { echo "freeze_constraints: no $VENV (run make test-latest first)" >&2; exit 2; }
mkdir -p requirements
pins=$("$VENV/bin/python" -m pip --disable-pip-version-check freeze --all --exclude-editable \
       | grep -v -i -E '^(torch|pip|nvidia-[a-z0-9_.-]*|cuda-[a-z0-9_.-]*)(==| @ )' | LC_ALL=C sort -f)
if grep -q " @ " <<<"$pins"; then
    echo "freeze_constraints: $VENV has packages from a path or URL, not a release:" >&2
    grep " @ " <<<"$pins" >&2
    exit 1
fi
{
    echo "# The exact versions the whole suite passed with; scripts/setup.sh installs with -c this file,"
    echo "# so a new upstream release cannot change what \`make test\` runs on."
    echo "# Made by scripts/freeze_constraints.sh from $VENV ($("$VENV/bin/python" -c 'import platform; print("Python", platform.python_version())'), $(date -u +%Y-%m-%d))."
    echo "# torch is not here: scripts/setup.sh chooses its build (torch==2.13.0 CPU where there is no GPU)."
    echo "# To upgrade (deliberately): make test-latest, then bash scripts/freeze_constraints.sh, then make test."
    echo "$pins"
} > "$OUT"
echo "freeze_constraints: wrote $OUT ($(grep -c -v '^#' "$OUT") pins)"
