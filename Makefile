# One command to set up and run the quickstart, one to set up and run the tests.
VENV ?= .venv

.PHONY: setup setup-vllm demo test test-vllm lint check-builds update-pins clean

setup:
	@scripts/setup_env.sh

demo: setup
	$(VENV)/bin/reasondistill demo

test: setup
	$(VENV)/bin/python -m pytest

# The real vLLM engine and server (tests/test_vllm_engine.py), in a virtualenv of their own: vLLM pins an
# older transformers. About 2 minutes to set up (vLLM's CPU build, ~3.5 GB) and 3 to run on 2 CPU cores.
setup-vllm:
	@scripts/setup_vllm_env.sh

test-vllm: setup-vllm
	.venv-vllm/bin/python -m pytest tests/test_vllm_engine.py

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/ruff format --check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

# Before landing a change to a training-sensitive test, the testbed or the pins: those tests on 3 other
# testbed builds, with the margin of every check (about 35 min on 2 idle CPU cores the first time, 15 after).
check-builds: setup
	$(VENV)/bin/python scripts/check_builds.py

# Move constraints.txt to the newest versions pyproject.toml allows, if the whole suite passes with them.
update-pins:
	scripts/update_pins.sh

clean:
	rm -rf runs .pytest_cache
