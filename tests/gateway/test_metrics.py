"""Metrics an operator can trust: every answered request is counted once with the status it got
(an HTTP status over REST, a gRPC code over gRPC), refusals before routing included; client-made
names mint no series; the process and build series are there, and no `_created` ones."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gateway.metrics import Metrics
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
