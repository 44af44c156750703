"""The response cache on the heavy MLP (1024 -> 2048 -> 2048 -> 10): a hit against a miss. Not a
test: run it by hand or through `make bench-cache`.

    python benchmarks/cache.py [--requests 200] [--batches 1,32] [--out benchmarks/results/cache.md]

One gateway serves the heavy MLP (built here from fixed seeds) with `cache: {max_entries: 4096}`.
One tritonclient connection, one request at a time (c=1), sends `--requests` requests, each with
inputs no request sent before (every one a miss: computed, then kept), then the same number of
requests with one input it has answered already (every one a hit), for each batch size of
`--batches` (rows per request). Over gRPC (raw contents) and REST with Triton's binary tensors. Every answer is checked against onnxruntime run directly, and
the gateway's own hit and miss counters must agree with the plan. The ratio is the misses' p50
over the hits' p50, as the client sees it; beside it, the same ratio inside the gateway: the mean
of `modelyard_request_duration_seconds` (arrival at the data plane to its answer) over each
column's requests, which leaves out the protocol's and the client's share.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from drive import gateway, stop_servers_on_sigterm
from memory import emit

from gateway.tools.lab.machine import cpu_model
from scripts.build_models import _save, build_mlp

SIZES = (1024, 2048, 2048, 10)
NAME = "heavy_cached"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument(
        "--batches", default="1,32", help="rows per request, comma-separated: each batch gets its own rows"
    )
    parser.add_argument("--out", type=Path)
    return parser.parse_args()


def lookups(base: str) -> dict[str, float]:
    found = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.name == "modelyard_response_cache_lookups_total" and sample.labels["model"] == NAME:
                found[sample.labels["outcome"]] += sample.value
    return found


# The gateway's own time per request: the data plane's (arrival to answer), and the front door's
# decoding and encoding around it (phases of modelyard_request_phase_seconds).
SERVED = {
    "request": ("modelyard_request_duration_seconds", None),
    "decode": ("modelyard_request_phase_seconds", "decode"),
    "encode": ("modelyard_request_phase_seconds", "encode"),
}


def served_seconds(base: str) -> dict[str, tuple[float, float]]:
    """For each of SERVED: (sum of seconds, count) of the model's histogram."""
    found = {key: [0.0, 0.0] for key in SERVED}
    for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model") != NAME:
                continue
            for key, (metric, phase) in SERVED.items():
                if phase is not None and sample.labels.get("phase") != phase:
                    continue
                if sample.name == f"{metric}_sum":
                    found[key][0] += sample.value
                elif sample.name == f"{metric}_count":
                    found[key][1] += sample.value
    return {key: (total, count) for key, (total, count) in found.items()}


def mean_ms(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], *keys: str
) -> float:
    """The sum of the means of `keys` between two reads, in ms."""
    return sum((after[k][0] - before[k][0]) / (after[k][1] - before[k][1]) * 1000 for k in keys)


def timed(send: object, inputs: list[np.ndarray], session: ort.InferenceSession) -> list[float]:
    """Milliseconds per request, back to back; every answer checked after the last. (Checking each
    one between requests would run the model in this process between them: each request would then
    find the gateway idle and its caches cold, which is not what a hit under traffic meets.)"""
    times, answers = [], []
    for x in inputs:
        started = time.perf_counter()
        answers.append(send(x))  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    for x, answer in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(answer, session.run(None, {"input": x})[0], rtol=1e-4, atol=1e-5)
    return times


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    stop_servers_on_sigterm()
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelyard-cache-") as tmp:
        repo = Path(tmp) / "repo"
        model = repo / NAME / "1" / "model.onnx"
        _save(build_mlp(SIZES, seed=11, name=NAME), model)
        (repo / NAME / "config.yaml").write_text("backend: onnxruntime\ncache: {max_entries: 4096}\n")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model), options)
        with gateway(repo, "/v2/health/ready") as (base, endpoint, _):
            assert endpoint.grpc is not None
            grpc_client = triton_grpc.InferenceServerClient(endpoint.grpc)
            http_client = triton_http.InferenceServerClient(endpoint.http)

            def send_grpc(x: np.ndarray) -> np.ndarray:
                tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                return grpc_client.infer(NAME, [tensor]).as_numpy("logits")

            def send_rest(x: np.ndarray) -> np.ndarray:
                tensor = triton_http.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x, binary_data=True)
                out = triton_http.InferRequestedOutput("logits", binary_data=True)
                return http_client.infer(NAME, [tensor], outputs=[out]).as_numpy("logits")

            plan = [(b, p, f) for b in batches for p, f in (("gRPC", send_grpc), ("REST binary", send_rest))]
            for batch, protocol, send in plan:
                fresh = [
                    rng.standard_normal((batch, SIZES[0])).astype(np.float32) for _ in range(args.requests)
                ]
                send(rng.standard_normal((batch, SIZES[0])).astype(np.float32))  # the connection, warm
                before = lookups(base)
                start = served_seconds(base)
                misses = timed(send, fresh, session)
                middle = served_seconds(base)
                hits = timed(send, [fresh[0]] * args.requests, session)
                end = served_seconds(base)
                after = lookups(base)
                counted = (after["miss"] - before["miss"], after["hit"] - before["hit"])
                if counted != (args.requests, args.requests):
                    raise SystemExit(f"{protocol}: the gateway counted {counted} misses and hits")
                miss_p50, hit_p50 = statistics.median(misses), statistics.median(hits)
                inside = (mean_ms(start, middle, "request"), mean_ms(middle, end, "request"))
                door = (
                    mean_ms(start, middle, *SERVED),
                    mean_ms(middle, end, *SERVED),
                )
                rows.append((batch, protocol, miss_p50, hit_p50, miss_p50 / hit_p50, *door, *inside))
            grpc_client.close()
            http_client.close()
    cpu = cpu_model()
    lines = [
        f"# Response cache, heavy MLP {' -> '.join(map(str, SIZES))}, c=1",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {cpu} ({os.cpu_count()} cores), "
        f"{args.requests} requests per column, load average {os.getloadavg()[0]:.1f} at the end; "
        f"command: `python benchmarks/cache.py --requests {args.requests} --batches {args.batches}`.",
        "",
        "A hit skips the backend, not the protocol: its time is the request's own path through the "
        "client and the gateway, so the speed-up is bounded by (that path + the model's compute) / that path.",
        "",
        "Three ways to time one request, each a column group of miss, hit and speed-up:",
        "",
        "- **client**: the p50 that tritonclient sees, its own encoding and the transport included;",
        "- **gateway**: the mean of the gateway's own time, from the front door's decoding to the end of "
        "its encoding (the data plane's duration plus the decode and encode phases);",
        "- **data plane**: the mean of `modelyard_request_duration_seconds` alone.",
        "",
        "Each column's requests run back to back, and their answers are checked after the last.",
        "",
        "| batch | protocol | client: miss ms | hit ms | speed-up (goal: at least 5x) "
        "| gateway: miss ms | hit ms | speed-up | data plane: miss ms | hit ms | speed-up |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {b} | {p} | {m:.3f} | {h:.3f} | {r:.1f}x ({'met' if r >= 5 else 'NOT met'}) "
            f"| {dm:.3f} | {dh:.3f} | {dm / dh:.1f}x ({'met' if dm / dh >= 5 else 'NOT met'}) "
            f"| {gm:.3f} | {gh:.3f} | {gm / gh:.1f}x |"
            for b, p, m, h, r, dm, dh, gm, gh in rows
        ),
    ]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
