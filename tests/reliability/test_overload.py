"""Overload: many concurrent clients against tiny limits. Every request gets a correct answer or
a 429 with Retry-After at once; none hangs; the gateway's memory stays bounded."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from scripts.build_models import _save
from tests.reliability.test_faults import metric
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import build_spin

CLIENTS = 48
REQUESTS_PER_CLIENT = 4
N = 300  # an n x n product: a few milliseconds, long enough for requests to overlap
# The gateway's caps across all models (MODELYARD_GLOBAL_MAX_*).
GLOBAL_INFLIGHT, GLOBAL_QUEUE = 4, 4


def expected_sum(n: int) -> float:
    ones = np.ones((n, n), dtype=np.float32)
    return float((ones @ ones).sum())


@pytest.fixture(scope="module")
def overload_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("overload_repo")
    limits = {"tiny": "{max_inflight: 1, max_queue: 2}", "wide": "{max_inflight: 64, max_queue: 256}"}
    for name, limit in limits.items():
        _save(build_spin(), repo / name / "1" / "model.onnx")
        (repo / name / "config.yaml").write_text(f"backend: onnxruntime\nlimits: {limit}\n")
    env = {
        "MODELYARD_GLOBAL_MAX_INFLIGHT": str(GLOBAL_INFLIGHT),
        "MODELYARD_GLOBAL_MAX_QUEUE": str(GLOBAL_QUEUE),
    }
    running = start_gateway(repo, tmp_path_factory.mktemp("overload_logs") / "gateway.log", env=env)
    yield running
    running.stop()


def storm(gateway: RunningGateway, model: str, headers: dict[str, str] | None = None) -> Counter[int]:
    """CLIENTS threads at once, each sending REQUESTS_PER_CLIENT requests; checks every answer."""
    body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [N]}]}
    want = expected_sum(N)
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(CLIENTS)

    def client() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30, headers=headers) as http:
            start.wait()
            for _ in range(REQUESTS_PER_CLIENT):
                response = http.post(f"/v2/models/{model}/infer", json=body)
                problem = None
                if response.status_code == 200:
                    got = response.json()["outputs"][0]["data"][0]
                    if not np.isclose(got, want, rtol=1e-5):
                        problem = f"wrong answer {got}, want {want}"
                elif response.status_code == 429:
                    if int(response.headers.get("Retry-After", "0")) < 1:
                        problem = f"429 without Retry-After: {response.headers}"
                else:
                    problem = f"{response.status_code}: {response.text}"
                with lock:
                    statuses[response.status_code] += 1
                    if problem:
                        problems.append(problem)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    assert problems == [], problems[:5]
    assert sum(statuses.values()) == CLIENTS * REQUESTS_PER_CLIENT
    return statuses


def test_a_tiny_model_limit_answers_or_refuses_every_request(overload_gateway: RunningGateway) -> None:
    before = metric(overload_gateway, "modelyard_rejected_requests_total", model="tiny", reason="model_limit")
    statuses = storm(overload_gateway, "tiny")
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    after = metric(overload_gateway, "modelyard_rejected_requests_total", model="tiny", reason="model_limit")
    assert after - before == statuses[429]
    assert "event=rejected reason=model_limit request_id=" in overload_gateway.output()


def test_the_global_cap_refuses_beyond_it_across_models(overload_gateway: RunningGateway) -> None:
    # "wide" allows 64 at once by itself: only the gateway's global cap of 4 + 4 can refuse.
    statuses = storm(overload_gateway, "wide")
    assert statuses[200] > 0 and statuses[429] > 0, statuses
    assert (
        metric(overload_gateway, "modelyard_rejected_requests_total", model="wide", reason="global_limit")
        == statuses[429]
    )


def test_over_grpc_the_refusal_is_resource_exhausted(overload_gateway: RunningGateway) -> None:
    codes: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        grpc_client = triton_grpc.InferenceServerClient(overload_gateway.grpc)
        tensor = triton_grpc.InferInput("n", [1], "INT64")
        tensor.set_data_from_numpy(np.array([N], dtype=np.int64))
        for _ in range(REQUESTS_PER_CLIENT):
            try:
                result = grpc_client.infer("tiny", [tensor], client_timeout=30)
            except InferenceServerException as exc:
                code = str(exc.status()).removeprefix("StatusCode.")
            else:
                code = "OK" if np.isclose(result.as_numpy("sum")[0], expected_sum(N), rtol=1e-5) else "WRONG"
            with lock:
                codes[code] += 1
        grpc_client.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS // 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads), "a request hangs"
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes


def test_low_priority_may_fill_only_half_the_queue(overload_gateway: RunningGateway) -> None:
    """tiny runs one request and queues two; a low-priority request may take one queue place."""
    long_body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [3000]}]}
    short_body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [2]}]}
    url = f"{overload_gateway.url}/v2/models/tiny/infer"
    results: dict[str, int] = {}
    finished: dict[str, float] = {}

    def send(key: str, body: dict[str, object], priority: str) -> None:
        results[key] = httpx.post(url, json=body, headers={"X-Priority": priority}, timeout=60).status_code
        finished[key] = time.monotonic()

    holder = threading.Thread(target=send, args=("holder", long_body, "normal"))
    holder.start()
    wait_for(overload_gateway, "modelyard_inflight_requests", "tiny", lambda value: value == 1)
    # The low request takes a while to run: served after the high one, it ends well after it.
    low_body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [600]}]}
    first_low = threading.Thread(target=send, args=("low", low_body, "low"))
    first_low.start()
    wait_for(overload_gateway, "modelyard_queued_requests", "tiny", lambda value: value == 1)
    refused = httpx.post(url, json=short_body, headers={"X-Priority": "low"}, timeout=10)
    assert refused.status_code == 429 and "half of it for low priority" in refused.text
    high = httpx.post(url, json=short_body, headers={"X-Priority": "high"}, timeout=60)
    high_finished = time.monotonic()
    assert high.status_code == 200
    holder.join(60)
    first_low.join(60)
    assert results == {"holder": 200, "low": 200}
    # The high-priority request came after the low one, and was served first.
    assert high_finished < finished["low"]
    bad = httpx.post(url, json=short_body, headers={"X-Priority": "urgent"}, timeout=10)
    assert bad.status_code == 400 and "high, normal or low" in bad.text


def wait_for(gateway: RunningGateway, gauge: str, model: str, holds: Callable[[float], bool]) -> None:
    deadline = time.monotonic() + 30
    while not holds(value := metric(gateway, gauge, model=model)):
        assert time.monotonic() < deadline, f"{gauge} of {model} is still {value}"
        time.sleep(0.02)


def test_memory_stays_bounded_under_repeated_overload(overload_gateway: RunningGateway) -> None:
    process = psutil.Process(overload_gateway.process.pid)
    storm(overload_gateway, "tiny")  # warm: every buffer and thread the storms need exists now
    before = process.memory_info().rss
    for _ in range(2):
        storm(overload_gateway, "tiny")
        storm(overload_gateway, "wide")
    grown_mb = (process.memory_info().rss - before) / 2**20
    # Four storms of 192 requests each, most refused: anything queued without bound would show.
    assert grown_mb < 40, f"RSS grew {grown_mb:.1f} MiB"
