"""The status page and /status: the traffic window on the metrics, then a real gateway's answers."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.status import MetricsWindow, histogram_quantile
from tests.support import RunningGateway, grpc_server, start_gateway

LABELS = ("affine", "1", "onnxruntime", "rest")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def observe(metrics: Metrics, seconds: list[float], code: str = "200", model: str = "affine") -> None:
    labels = (model, *LABELS[1:])
    for value in seconds:
        metrics.requests.labels(*labels, code).inc()
        metrics.request_duration.labels(*labels).observe(value)


def test_rates_cover_the_window_and_forget_what_came_before() -> None:
    metrics, clock = Metrics(), Clock()
    window = MetricsWindow(metrics, clock)
    observe(metrics, [0.001] * 50)
    clock.now += 4.0
    first = window.traffic()["affine"]  # the first look counts from the window's start
    assert (first.requests, first.window_s, first.req_per_s) == (50, 4.0, pytest.approx(12.5))
    clock.now += 2.0  # younger than the window: the first look is no base yet
    assert window.traffic()["affine"].window_s == 6.0
    clock.now += 6.0
    observe(metrics, [0.002] * 30)
    observe(metrics, [0.002] * 10, code="503")
    traffic = window.traffic()["affine"]  # since the look 6 s ago, the newest at least 5 s old
    assert traffic.requests == 40
    assert traffic.window_s == 6.0
    assert traffic.req_per_s == pytest.approx(40 / 6)
    assert traffic.error_rate == pytest.approx(0.25)
    clock.now += 10.0  # nothing new: an idle model shows no rate and no percentiles
    window.traffic()
    clock.now += 2.0
    idle = window.traffic()["affine"]
    assert (idle.requests, idle.req_per_s, idle.p50_ms, idle.p99_ms) == (0, 0.0, None, None)


def test_percentiles_fall_in_the_bucket_of_the_observations() -> None:
    metrics, clock = Metrics(), Clock()
    window = MetricsWindow(metrics, clock)
    window.traffic()
    rng = np.random.default_rng(0)
    fast = rng.uniform(0.0011, 0.0024, 990).tolist()  # the (1 ms, 2.5 ms] bucket
    slow = rng.uniform(0.06, 0.09, 10).tolist()  # the (50 ms, 100 ms] bucket
    observe(metrics, fast + slow)
    clock.now += 1.0
    traffic = window.traffic()["affine"]
    assert traffic.p50_ms is not None and 1.0 < traffic.p50_ms <= 2.5
    assert traffic.p99_ms is not None and 2.5 <= traffic.p99_ms <= 100.0


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    cumulative = [0.0] * (len(LATENCY_BUCKETS) + 1)
    index = LATENCY_BUCKETS.index(0.01)  # 100 observations in (5 ms, 10 ms]
    for i in range(index, len(cumulative)):
        cumulative[i] = 100.0
    lower, upper = LATENCY_BUCKETS[index - 1] * 1000, LATENCY_BUCKETS[index] * 1000
    assert histogram_quantile(0.5, cumulative) == pytest.approx(lower + (upper - lower) * 0.5)
    assert histogram_quantile(0.99, [0.0] * len(cumulative)) is None


def test_status_json_names_models_backends_and_memory(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        status = client.get("/status").json()
        models = {m["name"]: m for m in status["models"]}
        assert models["affine_tf"]["twin_of"] == "affine"
        assert models["routed"]["traffic_weights"] or models["routed"]["labels"]
        version = models["affine"]["versions"][0]
        assert (version["backend"], version["state"], version["backend_ready"]) == (
            "onnxruntime",
            "READY",
            True,
        )
        assert version["breaker"] is None  # no breaker is wired
        (own,) = [p for p in status["processes"] if p["name"] == "gateway"]
        assert own["pid"] == gateway.process.pid and own["rss_bytes"] > 10 * 2**20
        assert {"affine:1", "affine_tf:1", "affine_litert:1", "affine_keras:1"} <= set(own["serves"])
        # One process, no supervisor: the gateway is its own only worker.
        (worker,) = status["workers"]
        assert status["worker_count"] == 1 and status["supervisor_pid"] is None
        assert (worker["pid"], worker["restarts"], worker["ready"]) == (gateway.process.pid, 0, True)
        assert status["repository_api"]  # the session gateway turns it on
        assert status["grpc_server"] == grpc_server()
        index = {(e["name"], e["version"]): e for e in status["index"]}
        assert index[("broken_artifact", "1")]["state"] == "UNAVAILABLE"


def test_status_traffic_moves_with_requests(gateway: RunningGateway) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
    with httpx.Client(base_url=gateway.url) as client:
        client.get("/status")  # a baseline for the window
        for _ in range(20):
            assert client.post("/v2/models/affine_twin/infer", json=body).status_code == 200
        traffic = {m["name"]: m["traffic"] for m in client.get("/status").json()["models"]}["affine_twin"]
    assert traffic["requests"] >= 20 and traffic["req_per_s"] > 0
    assert traffic["p50_ms"] is not None and traffic["error_rate"] == 0.0


def test_page_is_server_rendered_without_outside_resources(gateway: RunningGateway) -> None:
    with httpx.Client(base_url=gateway.url) as client:
        page = client.get("/")
        panel = client.get("/status/panel")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for text in (page.text, panel.text):
        assert 'data-model="affine_tf"' in text and "tensorflow" in text
    assert 'data-action="unload"' in panel.text  # the repository API is on here
    assert "src=" not in page.text and "https://" not in page.text


def test_page_offers_no_buttons_while_the_repository_api_is_off(small_repo: Path, tmp_path: Path) -> None:
    running = start_gateway(small_repo, tmp_path / "gateway.log")
    try:
        with httpx.Client(base_url=running.url) as client:
            status = client.get("/status").json()
            page = client.get("/")
            panel = client.get("/status/panel")
    finally:
        running.stop()
    assert not status["repository_api"]
    for text in (page.text, panel.text):
        assert 'data-model="affine"' in text
        assert "<button" not in text
    assert "--enable-repository-api" in panel.text
    assert "<th></th>" not in panel.text  # no column for buttons that are not there
    # Without a budget versions load side by side: no per-version figure that holds the others'.
    assert (
        "no memory budget" in panel.text and 'title="measured alone only under a memory budget"' in panel.text
    )
