# Fresh machine: `make demo` runs a real prune job end to end; `make test` runs the tests.
PYTHON ?= python3
export HF_HUB_OFFLINE ?= 1
export PRUNE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo serve test test-fast lint bench-quality bench-speed bench-scale

install:
	bash scripts/install.sh

demo: install
	$(PYTHON) scripts/stack.py demo

serve: install
	$(PYTHON) scripts/stack.py serve

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not e2e and not faults and not slow"

lint:
	ruff check . && ruff format --check .

bench-quality:
	$(PYTHON) bench/quality.py --out docs/bench/quality.json

bench-speed:
	$(PYTHON) bench/speed.py --out docs/bench/speed.json

bench-scale:
	$(PYTHON) bench/scale.py --out docs/bench/scale.json
