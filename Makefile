# One command to set up and run the quickstart, one to set up and run the tests.
VENV ?= .venv

.PHONY: setup demo test lint clean

setup:
	@scripts/setup_env.sh

demo: setup
	$(VENV)/bin/reasondistill demo

test: setup
	$(VENV)/bin/python -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

clean:
	rm -rf runs .pytest_cache
