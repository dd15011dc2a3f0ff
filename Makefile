# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv/ at the repo root and install the pinned versions of requirements.lock.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test unit integration lint bench clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/rome-lens demo

test: $(STAMP)
	$(BIN)/ruff check rome_lens tests benchmarks
	$(BIN)/mypy rome_lens
	$(BIN)/python -m pytest -q tests

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

lint: $(STAMP)
	$(BIN)/ruff check rome_lens tests benchmarks
	$(BIN)/mypy rome_lens

bench: $(STAMP)
	$(BIN)/python benchmarks/edit_speed.py

clean:
	rm -rf $(VENV)
