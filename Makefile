# Two commands: `make demo` and `make test` (each runs `make setup` first when needed).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
GPU ?= 0
CONF ?= conf/local.yaml
PYTEST_ARGS ?=
QUICK ?= 0
BENCH_ARGS ?=

.PHONY: setup demo photos test test-fast benchmarks reliability clean-var

# Re-run setup when the pins or the package definition change; otherwise this is a no-op.
$(VENV)/.setup-done: setup.py pyproject.toml constraints.txt scripts/setup.sh
	GPU=$(GPU) bash scripts/setup.sh

setup:
	GPU=$(GPU) bash scripts/setup.sh

demo: $(VENV)/.setup-done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(CONF)

# The same workflow on a folder of your own photos, PHOTOS/<label>/*.jpg, with conf/profiles/photos.yaml.
photos: $(VENV)/.setup-done
	@test -n "$(PHOTOS)" || { echo "make photos PHOTOS=FOLDER: the folder of label folders to train on" >&2; exit 2; }
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh $(CONF) --conf conf/profiles/photos.yaml \
		--set ingest.source.path=$(abspath $(PHOTOS))

test: $(VENV)/.setup-done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.setup-done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Every benchmark script, one report (var/benchmarks/report.md and .json, an MLflow run); QUICK=1: the short version.
benchmarks: $(VENV)/.setup-done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/benchmarks.py $(if $(filter 1,$(QUICK)),--quick) $(BENCH_ARGS)

reliability: $(VENV)/.setup-done
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) scripts/reliability.py $(PYTEST_ARGS)

clean-var:
	rm -rf var
