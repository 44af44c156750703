"""The gauges an autoscaler reads: requests in flight and queued, per model and for the whole
gateway, as Prometheus scrapes them while requests queue behind a model's limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.build_models import _save
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import build_spin

REQUESTS = 4
# An n x n product: long enough (tenths of a second here) that the others wait behind the first.
N = 1200


@pytest.fixture(scope="module")
def limited_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("scaling_repo")
    _save(build_spin(), repo / "spin" / "1" / "model.onnx")
    (repo / "spin" / "config.yaml").write_text("limits: {max_inflight: 1, max_queue: 8}\n")
    running = start_gateway(repo, tmp_path_factory.mktemp("scaling_logs") / "gateway.log")
    yield running
    running.stop()


def gauges(http: httpx.Client) -> dict[tuple[str, str], float]:
    """Each sample of the four load gauges, keyed by (metric name, model label or "")."""
    wanted = {
        "modelyard_gateway_inflight_requests",
        "modelyard_gateway_queued_requests",
        "modelyard_inflight_requests",
        "modelyard_queued_requests",
    }
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for sample in family.samples:
            if sample.name in wanted:
                found[(sample.name, sample.labels.get("model", ""))] = sample.value
    return found


def test_the_load_gauges_follow_requests_in_flight_and_queued(limited_gateway: RunningGateway) -> None:
    body = {"inputs": [{"name": "n", "datatype": "INT64", "shape": [1], "data": [N]}]}
    statuses: list[int] = []
    start = threading.Barrier(REQUESTS)

    def client() -> None:
        with httpx.Client(base_url=limited_gateway.url, timeout=60) as http:
            start.wait()
            statuses.append(http.post("/v2/models/spin/infer", json=body).status_code)

    with httpx.Client(base_url=limited_gateway.url, timeout=10) as http:
        idle = gauges(http)
        assert idle[("modelyard_gateway_inflight_requests", "")] == 0
        assert idle[("modelyard_gateway_queued_requests", "")] == 0
        threads = [threading.Thread(target=client, daemon=True) for _ in range(REQUESTS)]
        for thread in threads:
            thread.start()
        busiest: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(t.is_alive() for t in threads):
            seen = gauges(http)
            queued = seen.get(("modelyard_gateway_queued_requests", ""), 0)
            if queued > busiest.get(("modelyard_gateway_queued_requests", ""), 0):
                busiest = seen
            time.sleep(0.02)
        for thread in threads:
            thread.join(60)
        assert statuses == [200] * REQUESTS
        assert busiest, "no scrape saw a queued request"
        # One runs (the model's max_inflight), the rest wait; the gateway counts both.
        assert busiest[("modelyard_inflight_requests", "spin")] == 1
        assert (
            busiest[("modelyard_gateway_queued_requests", "")]
            == busiest[("modelyard_queued_requests", "spin")]
        )
        assert (
            busiest[("modelyard_gateway_inflight_requests", "")]
            >= 1 + busiest[("modelyard_gateway_queued_requests", "")]
        )
        assert busiest[("modelyard_gateway_inflight_requests", "")] <= REQUESTS
        after = gauges(http)
        for key in (
            ("modelyard_gateway_inflight_requests", ""),
            ("modelyard_gateway_queued_requests", ""),
            ("modelyard_inflight_requests", "spin"),
            ("modelyard_queued_requests", "spin"),
        ):
            assert after[key] == 0, key
