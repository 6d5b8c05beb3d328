# Two commands for a fresh machine: `make run` (the whole pipeline, quick preset, real
# CIFAR-10 from ../shared) and `make test` (the test suite). Both set up what they need.
VENV ?= .venv
RUN_DIR ?= runs/quick
ARCHIVE ?= ../shared/data/cifar10-jpeg.tar.gz
PYTEST_ARGS ?=

.PHONY: setup run test test-fast lint bench clean

setup:
	@bash scripts/setup.sh

run: setup
	$(VENV)/bin/kd-ddp pipeline --preset quick run.dir=$(RUN_DIR) data.root=$(ARCHIVE)

test: setup
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The in-process unit tests only (marker `fast`, see tests/conftest.py): < 2 minutes.
test-fast: setup
	$(VENV)/bin/python -m pytest -m fast $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check kd_ddp launch tests benchmarks

bench: setup
	$(VENV)/bin/python -m benchmarks

clean:
	rm -rf runs .pytest_cache
