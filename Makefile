# modelyard: `make serve` runs the gateway on the example repository; `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_REPO ?= model_repo
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: serve test test-slow install dev docs lint typecheck pytest models bench bench-peers soak bench-tools clean \
	bench-budget bench-warmup bench-cache \
	deploy-tools browser-tools torchserve-store images compose-up compose-down compose-smoke

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The example repository has TorchServe, TensorFlow, LiteRT and Keras models, so serving all of it
# takes those extras (torch's CPU wheel, TorchServe and its archiver, which run on the machine's
# Java 17; TensorFlow and the TF Serving API; ai-edge-litert; Keras 3), and the client extra
# (tritonclient's HTTP client, which the quick start's snippets use). `pip install modelyard`
# alone serves the ONNX models.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(PIP) --upgrade pip
	$(PIP) -e ".[torchserve,tensorflow,litert,keras,client]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.installed
	$(PIP) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.installed-dev

# SERVE_ARGS adds flags, e.g. make serve SERVE_ARGS=--enable-repository-api (docs/guides/own-model.md).
SERVE_ARGS ?=
serve: install
	$(BIN)/modelyard serve --model-repo $(MODEL_REPO) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) $(SERVE_ARGS)

models: dev
	$(BIN)/python scripts/build_models.py --repo $(MODEL_REPO)
	$(BIN)/python -m scripts.build_tf_models --repo $(MODEL_REPO)
	$(BIN)/python -m scripts.build_torch_models --repo $(MODEL_REPO)

lint: dev
	$(BIN)/ruff check gateway adapters tests scripts benchmarks deploy conftest.py
	$(BIN)/ruff format --check gateway adapters tests scripts benchmarks deploy conftest.py

typecheck: dev
	$(BIN)/mypy

# The gRPC tests run once more on grpcio's server (MODELYARD_GRPC_SERVER=grpcio: the one a gateway
# with TLS runs), after the whole suite on the default (auto: the native server).
GRPCIO_TESTS := tests/gateway/test_infer.py tests/gateway/test_errors.py \
	tests/gateway/test_error_table.py tests/gateway/test_stream_infer.py tests/gateway/test_grpc_wire.py \
	tests/gateway/test_front_doors.py tests/gateway/test_health_metadata.py \
	tests/gateway/test_shared_memory.py tests/gateway/test_workers.py \
	tests/gateway/test_tfserving_front_door.py tests/reliability/test_connections.py \
	tests/reliability/test_drain.py tests/reliability/test_auth.py tests/reliability/test_overload.py \
	tests/adapters/test_v2.py

pytest: dev deploy-tools browser-tools
	$(BIN)/python -m pytest
	MODELYARD_GRPC_SERVER=grpcio $(BIN)/python -m pytest $(GRPCIO_TESTS)

# The documentation site (mkdocs.yml, docs/): a broken link, a page missing from the nav or a
# missing anchor fails the build. The site goes to site/ (ignored by git).
docs: dev
	$(BIN)/mkdocs build --strict --site-dir site

test: lint typecheck docs pytest

# The long reliability runs (tests marked slow): a managed TorchServe killed under load.
test-slow: dev deploy-tools
	$(BIN)/python -m pytest -m slow

# The benchmark suite: the peers table (in-process limits, the canned-answer floor, modelyard over
# REST JSON, REST binary and gRPC, MLServer in its best and its default setting, KServe, the heavy
# MLP with batching off and on, TorchServe direct and behind modelyard) with the goals' verdicts,
# dynamic batching on the heavy MLP, and memory. Results in benchmarks/results/.
# BATCHING_ARGS and MEMORY_ARGS, like PEERS_ARGS below, shorten a smoke run ("--duration 2").
BATCHING_ARGS ?= --duration 10
MEMORY_ARGS ?= --duration 60
bench: dev bench-tools
	$(MAKE) bench-peers
	$(BIN)/python benchmarks/batching.py $(BATCHING_ARGS) --out benchmarks/results/batching.md
	$(BIN)/python benchmarks/memory.py $(MEMORY_ARGS) --out benchmarks/results/memory.md

# The memory budget's figure: 12 ONNX models of 100 MiB (made in a temporary folder) on demand
# under a budget for 4, round-robin traffic over all 12 (docs/models.md). BUDGET_ARGS, e.g.
# "--models 6 --mib 20 --fit 2 --rounds 1" for a smoke run.
BUDGET_ARGS ?=
bench-budget: dev
	$(BIN)/python benchmarks/budget.py $(BUDGET_ARGS) --out benchmarks/results/budget.md

# The response cache on the heavy MLP: a hit against a miss, over gRPC and REST binary (docs/models.md).
CACHE_ARGS ?= --requests 300
bench-cache: dev
	$(BIN)/python benchmarks/cache.py $(CACHE_ARGS) --out benchmarks/results/cache.md

# First-request latency with and without warmup, ONNX Runtime and TensorFlow (docs/models.md).
WARMUP_ARGS ?= --trials 5
bench-warmup: dev
	$(BIN)/python benchmarks/warmup.py $(WARMUP_ARGS) --out benchmarks/results/warmup.md

# Issue 8's soak: minutes of good and hostile load on the example repository, RSS sampled throughout.
SOAK_ARGS ?= --minutes 5
soak: dev
	$(BIN)/python benchmarks/soak.py $(SOAK_ARGS) --out benchmarks/results/soak.md

# modelyard vs MLServer and KServe on the same ONNX model (benchmarks/README.md, "Peers"). The
# peers' venvs are made under benchmarks/peers/ on first use. PEERS_ARGS, e.g. a smoke run:
# PEERS_ARGS="--duration 2 --warmup 1 --concurrency 1,8".
PEERS_ARGS ?=
bench-peers: dev bench-tools
	$(BIN)/python benchmarks/peers.py $(PEERS_ARGS)

# h2load (Debian's nghttp2-client) drives the REST and gRPC rows of the benchmarks; hey is the REST
# fallback. Installs them only when missing, and only as root where apt can; elsewhere peers.py
# falls back to hey or load.py for those rows and says so in its table.
bench-tools:
	@if { ! command -v hey || ! command -v h2load; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing hey and h2load (Debian packages) for the peers benchmark"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey nghttp2-client >/dev/null; \
	fi

# tests/deploy validate docker-compose.yml with `docker-compose config` (Debian's docker-compose;
# kubectl is already on these machines). Installs it only when missing, and only as root, where
# apt can; elsewhere those tests say what is missing and skip.
deploy-tools:
	@if ! command -v docker-compose >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing docker-compose (Debian package) for the compose checks"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null; \
	fi

# tests/gateway/test_status_browser.py opens the status page in Debian's chromium through Playwright
# (no browser download). Installs it only when missing, and only as root, where apt can; elsewhere
# that test says what is missing and skips.
browser-tools:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian package) for the status page's browser test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	fi

# The compose stack's TorchServe model store: each version of the mlp_torch example archived with
# modelyard's handler, as docs/backends/torchserve.md shows for any remote TorchServe. TorchServe
# (load_models=all) registers both archives as versions 1 and 2 of one model.
TS_STORE := deploy/torchserve/model-store
TS_MODEL := mlp_torch
TS_VERSIONS := 1 2
COMPOSE ?= docker-compose -p modelyard

torchserve-store: $(foreach v,$(TS_VERSIONS),$(TS_STORE)/$(TS_MODEL)-v$(v).mar)

$(TS_STORE)/$(TS_MODEL)-v%.mar: model_repo/$(TS_MODEL)/%/model.pt adapters/torchserve/modelyard_handler.py | $(VENV)/.installed
	mkdir -p $(TS_STORE)/build-v$*
	echo '{"inputs": ["input"], "outputs": ["logits"], "threads": 1}' > $(TS_STORE)/build-v$*/modelyard.json
	$(BIN)/torch-model-archiver --model-name $(TS_MODEL) --version $* --serialized-file $< \
		--handler adapters/torchserve/modelyard_handler.py --extra-files $(TS_STORE)/build-v$*/modelyard.json \
		--export-path $(TS_STORE)/build-v$* --force
	mv $(TS_STORE)/build-v$*/$(TS_MODEL).mar $@
	rm -rf $(TS_STORE)/build-v$*

# The gateway image (with the extras the compose stack needs) and the model bundle image that
# Kubernetes' dev overlay copies models from. Tag them for your registry and set `images:` in an overlay.
IMAGE_TAG ?= 0.1.0
images: torchserve-store
	docker build -f deploy/Dockerfile --build-arg EXTRAS=tensorflow -t modelyard:$(IMAGE_TAG) .
	docker build -f deploy/models.Dockerfile -t modelyard-models:$(IMAGE_TAG) .

compose-up: torchserve-store
	$(COMPOSE) up -d --build

compose-down:
	$(COMPOSE) down --remove-orphans

# One request per backend through the gateway, once the stack answers ready.
compose-smoke: install
	$(BIN)/python deploy/smoke.py --url http://127.0.0.1:$(HTTP_PORT) --wait-s 300

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache site
