# fedagg — two set-up commands: `make demo` and `make test`.
# Both create .venv on a fresh machine and install everything they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= runs/demo

# Keep local Ray on 127.0.0.1 (see docs/ray.md) and never phone home.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_DEDUP_LOGS := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE ?= 1
export MPLBACKEND := Agg
export PYTHONHASHSEED := 0

.PHONY: demo test test-fast lint bench clean install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this is the CPU wheel on disk; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# Test-only oracles (never imported by the package): ByzFL without its torchvision deps, geom-median.
	$(PY) -m pip install --quiet --no-deps byzfl==0.0.11 geom-median==0.1.0
	touch $(STAMP)

# demo: FedAU vs fedavg-participating vs the known-p oracle under unknown heterogeneous participation
# (100 clients, 1,000 rounds each, about a minute on a laptop CPU): three curves in one figure.
demo: $(STAMP)
	$(PY) -m simulations.demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check fedagg strategies simulations tests

clean:
	rm -rf $(VENV) .pytest_cache runs
