# The two commands of the README: `make demo` (the main job) and `make test`.
# Both set up .venv first (idempotent; CPU torch where there is no GPU), at the exact versions of
# requirements/constraints.txt. `make test-latest` runs the suite on the newest releases instead.
VENV   := .venv
PY     := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test test-fast test-latest clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

# The newest release of every dependency (torch aside), in .venv-latest, without the constraints.
# Upgrades are deliberate: when this passes, bash scripts/freeze_constraints.sh, then make test.
test-latest:
	@bash scripts/setup.sh --latest
	.venv-latest/bin/python -m pytest -q

clean:
	rm -rf $(VENV) .venv-latest runs .pytest_cache
