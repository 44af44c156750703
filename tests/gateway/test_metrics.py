"""Metrics an operator can trust: every answered request is counted once with the status it got
(an HTTP status over REST, a gRPC code over gRPC), refusals before routing included; client-made
names mint no series; the process and build series are there, and no `_created` ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gateway import request_series
from gateway.metrics import LATENCY_BUCKETS, Metrics
from tests.support import Protocol, RunningGateway


def samples(gateway: RunningGateway) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def requests_total(gateway: RunningGateway, **labels: str) -> float:
    return sum(
        value
        for (name, found), value in samples(gateway).items()
        if name == "modelyard_requests_total" and labels.items() <= dict(found).items()
    )


def test_refusals_of_a_model_that_is_not_ready_are_counted(
    protocol: Protocol, gateway: RunningGateway
) -> None:
    """broken_artifact failed to load: its 503s are in the count, so an outage shows as errors."""
    code = "UNAVAILABLE" if protocol.is_grpc else "503"
    before = requests_total(gateway, model="broken_artifact", protocol=protocol.name, code=code)
    tensor = protocol.input("INPUT", np.ones((1, 2), np.float32), "FP32")
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            protocol.client.infer("broken_artifact", [tensor])
    assert requests_total(gateway, model="broken_artifact", protocol=protocol.name, code=code) == before + 3


def test_unknown_model_names_mint_no_series(gateway: RunningGateway) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
    before = requests_total(gateway, model="", code="404", protocol="rest")
    for index in range(5):
        assert httpx.post(f"{gateway.url}/v2/models/made-up-{index}/infer", json=body).status_code == 404
    assert requests_total(gateway, model="", code="404", protocol="rest") == before + 5
    assert not [key for key in samples(gateway) if any(v.startswith("made-up") for _, v in key[1])]


def test_process_and_build_series_and_no_created_ones(gateway: RunningGateway) -> None:
    names = {name for name, _ in samples(gateway)}
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total", "modelyard_build_info"} <= names
    assert not [name for name in names if name.endswith("_created")]


def test_a_worker_metric_file_not_yet_sized_does_not_fail_a_scrape(tmp_path: Path) -> None:
    """prometheus-client creates a worker's value file empty, then sizes it: a scrape (or a status
    read) in between read the empty file and failed whole, as a worker started or restarted."""
    (tmp_path / "counter_4242.db").touch()
    text = Metrics(multiprocess_dir=tmp_path).render().decode()
    # The render went through: the platform collector's family is there beside the workers' files.
    assert text.startswith("# HELP python_info")


# The per-request series hold their observations and add them in bulk ----------------------------

LABELS = ("m", "1", "onnxruntime", "rest")


def histogram_samples(metrics: Metrics, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith(name)
    }


async def test_held_observations_land_in_the_buckets_observe_would_pick() -> None:
    """Values on, between, under and over the bounds: the bulk add gives what prometheus-client's
    own observe() gives, bucket by bucket, with the same sum and count."""
    bounds = LATENCY_BUCKETS
    values = [*bounds, *(b * 0.999 for b in bounds), *(b * 1.001 for b in bounds), 0.0, 1e-9, 99.0]
    values += list(np.random.default_rng(7).exponential(0.01, 500))
    held, direct = Metrics(), Metrics()
    series = held.series(*LABELS)
    for value in values:
        series.duration.observe(value)
        direct.request_duration.labels(*LABELS).observe(value)
    got = histogram_samples(held, "modelyard_request_duration_seconds")
    want = histogram_samples(direct, "modelyard_request_duration_seconds")
    # The sum is added in parts, so it may differ in its last bits; the buckets and count not at all.
    assert got.keys() == want.keys()
    for key, value in got.items():
        assert value == (pytest.approx(want[key], rel=1e-12) if key[0].endswith("_sum") else want[key]), key
    counts = [value for (name, _), value in got.items() if name.endswith("_count")]
    assert counts == [len(values)]


async def test_held_observations_are_written_within_the_flush_interval() -> None:
    """Inside the event loop a request's observations wait in the series; a scrape of the process
    writes them at once, and the timer writes them within FLUSH_S for the other workers' scrapes."""
    metrics = Metrics()
    series = metrics.series(*LABELS)
    child = metrics.requests.labels(*LABELS, "200")
    series.count("200")
    series.count("200")
    assert child._value.get() == 0  # held
    await asyncio.sleep(request_series.FLUSH_S * 3)
    assert child._value.get() == 2  # the timer wrote them
    series.count("200")
    assert requests_in(metrics.render()) == 3  # a scrape writes what is held first


async def test_a_series_holds_at_most_buffer_max_observations() -> None:
    metrics = Metrics()
    series = metrics.series(*LABELS)
    child = metrics.request_duration.labels(*LABELS)
    for _ in range(request_series.BUFFER_MAX):
        series.duration.observe(0.001)
    assert child._sum.get() == pytest.approx(0.001 * request_series.BUFFER_MAX)
    series.duration.observe(0.001)
    assert child._sum.get() == pytest.approx(0.001 * request_series.BUFFER_MAX)  # the next one is held


def test_outside_the_event_loop_observations_are_written_at_once() -> None:
    metrics = Metrics()
    metrics.series(*LABELS).count("200")
    assert metrics.requests.labels(*LABELS, "200")._value.get() == 1


def requests_in(text: bytes) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == "modelyard_requests_total"
    )
