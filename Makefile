# dmgr: two set-up commands on a fresh machine: `make synth` and `make test`.
# The first use creates .venv with the pinned CPU torch; elsewhere pass your own CUDA build:
#   make venv TORCH_SPEC="torch==2.6.0 --index-url https://download.pytorch.org/whl/cu124"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
ARGS ?=
SHARDS ?= $(lastword $(sort $(wildcard outputs/*/shards)))
OUT ?= preview.png

.PHONY: venv synth test bench lint preview sweep clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

synth: venv
	$(PY) -m dmgr.synth $(ARGS)

test: venv
	$(PY) -m pytest -q tests $(ARGS)

bench: venv
	$(PY) -m dmgr.bench $(ARGS)

lint: venv
	$(VENV)/bin/ruff check dmgr tests

preview: venv
	$(PY) -m dmgr.preview $(SHARDS) --out $(OUT) $(ARGS)

clean-venv:
	rm -rf $(VENV)
