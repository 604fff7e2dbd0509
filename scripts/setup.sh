#!/usr/bin/env bash
# Idempotent set-up of .venv: torch first (the CPU wheel where there is no GPU,
# so pip never pulls a multi-GB CUDA build), then the package and its extras,
# at the exact versions of requirements/constraints.txt (what the suite passed with).
#
#   bash scripts/setup.sh            .venv, pinned by requirements/constraints.txt (make test, make demo)
#   bash scripts/setup.sh --latest   .venv-latest, the newest releases, no constraints (make test-latest);
#                                    upgrades are deliberate: run that, then scripts/freeze_constraints.sh
set -euo pipefail
cd "$(dirname "$0")/.."

LATEST=0
[ "${1:-}" = "--latest" ] && LATEST=1
PY=${PYTHON:-python3}
CONSTRAINTS=requirements/constraints.txt
if [ "$LATEST" = 1 ]; then VENV=.venv-latest; else VENV=.venv; fi
STAMP="$VENV/.sinkserve-installed"
want=$(cat pyproject.toml scripts/setup.sh "$CONSTRAINTS" | sha256sum | cut -c1-16)

# The end-to-end tests and the demo scrape metrics with a real Prometheus server (Debian package).
if ! command -v prometheus >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing prometheus (Debian package)"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    else
        echo "setup: warning: no prometheus binary; install it (apt-get install prometheus) for the end-to-end tests"
    fi
fi

# the pinned set-up is skipped when nothing changed; --latest always upgrades (that is its point)
if [ "$LATEST" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then GPU=1; fi

TORCH_PINS=()
[ "$LATEST" = 0 ] && TORCH_PINS=(-c "$CONSTRAINTS")
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    if [ "$GPU" = 1 ]; then
        echo "setup: GPU found, installing the CUDA build of torch"
        "${PIP[@]}" install torch
    else
        echo "setup: no GPU, installing the CPU build of torch"
        # torch 2.13.0 CPU lies on this kind of machine; elsewhere use PyTorch's CPU index.
        "${PIP[@]}" install torch==2.13.0 "${TORCH_PINS[@]}" 2>/dev/null \
            || "${PIP[@]}" install torch --index-url https://download.pytorch.org/whl/cpu
    fi
fi

# What pins the rest: the checked-in constraints, which leave torch out (the lines above choose its
# build). With a GPU, the CUDA build of torch chose its own companions (triton, sympy, nvidia-*, ...),
# so their pins are dropped. --latest pins only the torch installed here.
PINS="$VENV/constraints.txt"
if [ "$LATEST" = 1 ]; then
    "$VENV/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$PINS"
elif [ "$GPU" = 1 ]; then
    # the constraints less torch's requirement closure as installed
    "$VENV/bin/python" - "$CONSTRAINTS" > "$PINS" <<'EOF'
import importlib.metadata as md, re, sys
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
closure, todo = set(), ["torch"]
while todo:
    name = todo.pop()
    if name in closure:
        continue
    closure.add(name)
    try:
        reqs = md.requires(name) or []
    except md.PackageNotFoundError:
        continue
    todo += [norm(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in reqs if "extra ==" not in r]
for line in open(sys.argv[1]):
    m = re.match(r"([A-Za-z0-9_.-]+)==", line)
    if not (m and norm(m.group(1)) in closure):
        sys.stdout.write(line)
EOF
else
    cp "$CONSTRAINTS" "$PINS"
fi

echo "setup: installing sinkserve and its dependencies into $VENV"
# The build backend comes from the pins too (an isolated build would take the newest setuptools).
# (pip's notes about this machine's missing local index folders are filtered out; its exit code is kept)
UPGRADE=()
[ "$LATEST" = 1 ] && UPGRADE=(-U --upgrade-strategy eager)
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
quiet "${PIP[@]}" install "${UPGRADE[@]}" -c "$PINS" setuptools
quiet "${PIP[@]}" install "${UPGRADE[@]}" -c "$PINS" --no-build-isolation -e ".[test]"
echo "$want" > "$STAMP"
echo "setup: done"
