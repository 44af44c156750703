#!/usr/bin/env bash
# Start a gateway on the example repository, run the load benchmark against it, stop the gateway.
# Usage: benchmarks/run.sh [load.py flags...]   (ports from BENCH_HTTP_PORT / BENCH_GRPC_PORT)
set -euo pipefail
cd "$(dirname "$0")/.."
http_port=${BENCH_HTTP_PORT:-18000}
grpc_port=${BENCH_GRPC_PORT:-18001}
log=$(mktemp)
.venv/bin/modelyard serve --model-repo model_repo --host 127.0.0.1 \
    --http-port "$http_port" --grpc-port "$grpc_port" --log-level warning >"$log" 2>&1 &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$http_port/v2/health/ready" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1
done
.venv/bin/python benchmarks/load.py --http "127.0.0.1:$http_port" --grpc "127.0.0.1:$grpc_port" "$@"
