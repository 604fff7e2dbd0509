# The two commands of the README: `make demo` (the main job) and `make test`.
# Both set up .venv first (idempotent; CPU torch where there is no GPU).
VENV   := .venv
PY     := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled

.PHONY: setup demo test test-fast clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
