# Two commands set everything up: `make run` starts the product, `make test` runs the tests.
# Both create .venv with Python 3.11 and install the pinned requirements when they change.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test test-smoke lint format clean-venv gpu-check install-wandb

$(VENV)/bin/python:
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or pass PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Stamp files: reinstall only when a requirements file (or pyproject.toml) changed. The project
# itself is installed in editable mode, without dependencies (requirements.txt pins them), for
# its console command: .venv/bin/nanochat, the API client, usable from any directory.
$(VENV)/.installed: requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

$(VENV)/.installed-test: requirements.txt requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-test.txt
	@touch $@

# Optional Weights & Biases logging (README: "Weights & Biases"); `make test` works without it,
# and CI installs it first (.ci/run) so the W&B tests run there.
$(VENV)/.installed-wandb: requirements-wandb.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-wandb.txt
	@touch $@

install-wandb: $(VENV)/.installed-wandb

run: $(VENV)/.installed
	$(PY) manage.py up $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest $(PYTEST_ARGS)

# The start-up tests alone (`up` / `make run` started for real, with its web, workers and Redis
# processes), including the scripted newcomer trial (tests/site/test_newcomer.py).
test-smoke: $(VENV)/.installed-test
	$(PY) -m pytest -m services tests/site $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.installed-test
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The GPU check (training/gpu_check.py, <= 8 minutes on one GPU): CUDA tests, real training runs,
# engine and attention benchmarks, one table. It runs on the host's own Python, which must
# already hold a CUDA torch: the project's .venv where it exists, else python3. Wheels in
# $(GPU_WHEELS) (scripts/gpu_wheels.sh fetches them where a registry is reachable) are installed
# into a scratch folder first, for a host that cannot install packages itself.
# GPU_CHECK_DEVICE=cpu rehearses it on a CPU with tiny shapes (the test suite does).
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/nanochat-gpu-check-site
GPU_CHECK_ARGS ?=

gpu-check:
	@if ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
		echo "installing $(GPU_WHEELS)/*.whl into $(GPU_SITE)"; \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
			--upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; \
	fi
	PYTHONPATH=$(GPU_SITE)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m training.gpu_check $(GPU_CHECK_ARGS)
