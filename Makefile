# modelyard: `make serve` runs the gateway on the example repository; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model_repo
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: serve test install dev lint typecheck pytest models bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The example repository has TorchServe and TensorFlow models, so serving all of it takes both
# extras (torch's CPU wheel, TorchServe and its archiver, which run on the machine's Java 17;
# TensorFlow and the TF Serving API). `pip install modelyard` alone serves the ONNX models.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) -e ".[torchserve,tensorflow]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/modelyard serve --model-repo $(MODEL_REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT)

models: dev
	$(BIN)/python scripts/build_models.py --repo $(MODEL_REPO)
	$(BIN)/python -m scripts.build_tf_models --repo $(MODEL_REPO)
	$(BIN)/python -m scripts.build_torch_models --repo $(MODEL_REPO)

lint: dev
	$(BIN)/ruff check gateway adapters tests scripts benchmarks conftest.py
	$(BIN)/ruff format --check gateway adapters tests scripts benchmarks conftest.py

typecheck: dev
	$(BIN)/mypy

pytest: dev
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: dev
	benchmarks/run.sh --duration 10 --concurrency 8 --json-out benchmarks/results/load.json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
