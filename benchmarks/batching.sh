#!/usr/bin/env bash
# Dynamic batching on the heavy MLP (1024 -> 2048 -> 2048 -> 10): the same model served twice, once
# with gateway batching off and once on, under the same gRPC load. The model (25 MB) is built here
# from fixed seeds rather than committed.
# Usage: benchmarks/batching.sh [--duration 10] [--concurrency 16]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(mktemp -d)
log=$(mktemp)
http_port=${BENCH_HTTP_PORT:-18010}
grpc_port=${BENCH_GRPC_PORT:-18011}
.venv/bin/python - "$repo" <<'PY'
import sys
from pathlib import Path

from scripts.build_models import _save, build_mlp

repo = Path(sys.argv[1])
for name, batching in (("heavy", ""), ("heavy_batched", "batching: {max_batch_size: 16, max_queue_delay_us: 2000}\n")):
    _save(build_mlp((1024, 2048, 2048, 10), seed=11, name=name), repo / name / "1" / "model.onnx")
    (repo / name / "config.yaml").write_text(f"backend: onnxruntime\n{batching}")
PY
.venv/bin/modelyard serve --model-repo "$repo" --http-port "$http_port" --grpc-port "$grpc_port" --log-level warning >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; rm -rf "$repo" "$log"' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$http_port/v2/health/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
for model in heavy heavy_batched; do
    .venv/bin/python benchmarks/load.py --http "127.0.0.1:$http_port" --grpc "127.0.0.1:$grpc_port" \
        --model "$model" --onnx "$repo/heavy/1/model.onnx" --modes grpc --concurrency 16 "$@"
done
curl -s "http://127.0.0.1:$http_port/metrics" | grep -E '^modelyard_batch_size_(sum|count)' || true
