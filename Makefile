# Every target sets up what it needs first, so a fresh clone needs only `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTHON ?= python3
TYPED := fedtrain operator model trainer_image aggregator_image setup.py

.PHONY: demo test lint unit crd manifests clean

# Debian's prometheus package: promtool for the alert-rule tests and a real server for a scrape test.
PROMTOOL := /usr/bin/promtool
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[all,dev]'
	touch $(STAMP)

$(PROMTOOL):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends prometheus

## demo: a federated LoRA fine-tuning of examples/wafer-defects.yaml on this machine (about 10 minutes on 2 cores)
demo: $(STAMP)
	$(VENV)/bin/fedtrain run examples/wafer-defects.yaml --run-dir runs/wafer-defects --overwrite

## lint: ruff and mypy over the project
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy $(TYPED)

## test: ruff, then the whole pytest suite in two streams side by side, the end-to-end runs (mostly
## waiting on trainer processes) and the rest (its log printed after), with mypy beside them (a cold
## mypy takes over a minute of one core); fails if any of the three fails
test: $(STAMP) $(PROMTOOL)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy $(TYPED) > $(VENV)/mypy.log 2>&1 & typing=$$!; \
	$(VENV)/bin/pytest -m "not e2e" > $(VENV)/unit.log 2>&1 & units=$$!; \
	$(VENV)/bin/pytest -m e2e; tests=$$?; \
	wait $$units; unit=$$?; \
	echo "the other tests:"; cat $(VENV)/unit.log; \
	wait $$typing; typed=$$?; \
	echo "mypy:"; cat $(VENV)/mypy.log; \
	test $$tests -eq 0 && test $$unit -eq 0 && test $$typed -eq 0

## crd: regenerate the CRD (crds/ and charts/fedtrain/crds/) from fedtrain/api.py
crd: $(STAMP)
	$(VENV)/bin/fedtrain crd

## manifests: the CRDs, then manifests/install.yaml and the chart README's values table from the chart
manifests: crd
	$(VENV)/bin/python tools/render_manifests.py

## unit: the fast tests only
unit: $(STAMP) $(PROMTOOL)
	$(VENV)/bin/pytest -m "not e2e"

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
