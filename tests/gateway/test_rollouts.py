"""Shadow traffic and fallback over REST and gRPC. Models from tests/support/model_builders.py:
`shadowed` serves affine v1 and copies every request to its v2 (other weights: mismatch) and to
`affine_twin` (same weights: match); `slow_shadowed` copies to `affine_slow` (same answers, ~1 s);
`primary_broken` cannot load and falls back to `affine_twin`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.utils import InferenceServerException

from tests.support import Protocol, RunningGateway

X = np.random.default_rng(4).standard_normal((2, 4)).astype(np.float32)


def wait_for_metric(gateway: RunningGateway, name: str, at_least: float, **labels: str) -> None:
    for _ in range(600):  # bounded: 60 s at most
        if gateway.metric(name, **labels) >= at_least:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} never reached {at_least}")


def reference(repo: Path, model: str, version: int) -> np.ndarray:
    return ort.InferenceSession(str(repo / model / str(version) / "model.onnx")).run(None, {"x": X})[0]


def test_shadow_copies_are_compared_and_counted(
    protocol: Protocol, gateway: RunningGateway, test_repo: Path
) -> None:
    before_mismatch = gateway.metric(
        "modelyard_shadow_requests_total", model="shadowed", target="shadowed:2", outcome="mismatch"
    )
    before_match = gateway.metric(
        "modelyard_shadow_requests_total", model="shadowed", target="affine_twin", outcome="match"
    )
    for _ in range(3):
        result = protocol.client.infer("shadowed", [protocol.input("x", X, "FP32")])
        # The client gets the primary's answer, version 1, never the shadow's.
        np.testing.assert_allclose(result.as_numpy("y"), reference(test_repo, "shadowed", 1), rtol=1e-6)
    wait_for_metric(
        gateway,
        "modelyard_shadow_requests_total",
        before_mismatch + 3,
        model="shadowed",
        target="shadowed:2",
        outcome="mismatch",
    )
    wait_for_metric(
        gateway,
        "modelyard_shadow_requests_total",
        before_match + 3,
        model="shadowed",
        target="affine_twin",
        outcome="match",
    )
    assert gateway.metric("modelyard_shadow_max_abs_diff_count", model="shadowed", target="shadowed:2") >= 3
    # v1 and v2 differ by more than the tolerance, which is what made them mismatches.
    assert np.abs(reference(test_repo, "shadowed", 1) - reference(test_repo, "shadowed", 2)).max() > 1e-3


def test_client_does_not_wait_for_a_slow_shadow(gateway: RunningGateway, test_repo: Path) -> None:
    """The shadow takes about a second of compute: when the client has its answer, the shadow has
    not finished yet (had the gateway waited for it, it would have)."""
    labels = {"model": "slow_shadowed", "target": "affine_slow", "outcome": "match"}
    before = gateway.metric("modelyard_shadow_requests_total", **labels)
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}
    answer = httpx.post(f"{gateway.url}/v2/models/slow_shadowed/infer", json=body, timeout=60)
    assert answer.status_code == 200
    assert gateway.metric("modelyard_shadow_requests_total", **labels) == before
    wait_for_metric(gateway, "modelyard_shadow_requests_total", before + 1, **labels)


def test_fallback_answers_when_the_model_is_not_ready(
    protocol: Protocol, gateway: RunningGateway, test_repo: Path
) -> None:
    before = gateway.metric("modelyard_fallbacks_total", model="primary_broken", to="affine_twin")
    result = protocol.client.infer("primary_broken", [protocol.input("x", X, "FP32")])
    np.testing.assert_allclose(result.as_numpy("y"), reference(test_repo, "affine_twin", 1), rtol=1e-6)
    response = result.get_response()
    name = response.model_name if protocol.is_grpc else response["model_name"]
    assert name == "primary_broken"
    assert gateway.metric("modelyard_fallbacks_total", model="primary_broken", to="affine_twin") == before + 1


def test_a_request_for_a_named_version_does_not_fall_back(protocol: Protocol) -> None:
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.infer("primary_broken", [protocol.input("x", X, "FP32")], model_version="1")
    assert protocol.error_code(caught.value) == ("UNAVAILABLE" if protocol.is_grpc else "503")


def test_fallback_deployment_is_reported(gateway: RunningGateway) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}
    answer = httpx.post(f"{gateway.url}/v2/models/primary_broken/infer", json=body).json()
    assert answer["parameters"] == {"deployment": "affine_twin"}
