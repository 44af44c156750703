"""Backends that fail: one that accepts and never answers, one that answers too late, one that
refuses connections. The gateway answers 503/504 fast, the other models keep serving with zero
errors, and each recovers by itself once its backend does.

The failing backend is `FailingTorchServe` (stand_ins.py), a remote TorchServe stand-in; the
test that kills a real, managed TorchServe under load is in test_torchserve_kill.py.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from scripts.build_models import _save, build_affine
from tests.reliability.load import SteadyLoad
from tests.reliability.stand_ins import FailingTorchServe
from tests.support import RunningGateway, free_port, start_gateway

X = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float32)
BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}
# What the client allows itself: far shorter than the stand-in's hang or delay.
TIMEOUT_MS = 300
# "Fast": a refusal or a timeout answer comes within this many seconds of what it waits for.
SLACK_S = 1.5
REMOTE = """\
backend: torchserve
inputs: [{{name: x, datatype: FP32, shape: [-1, 4]}}]
outputs: [{{name: y, datatype: FP32, shape: [-1, 4]}}]
limits: {{timeout_ms: {timeout_ms}}}
torchserve:
  mode: remote
  inference_url: {url}
  timeout_s: 30
  resilience: {{failures: {failures}, open_s: {open_s}, retries: 2, backoff_ms: 20}}
"""


@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, FailingTorchServe]]:
    stand_ins = {name: FailingTorchServe(free_port()) for name in ("hung", "slow", "refusing")}
    for stand_in in stand_ins.values():
        stand_in.start_listening()
    yield stand_ins
    for stand_in in stand_ins.values():
        stand_in.close()


@pytest.fixture(scope="module")
def faulty_gateway(
    backends: dict[str, FailingTorchServe], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("faults_repo")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    failures = {"hung": 3, "slow": 10, "refusing": 3}
    # Long enough that the hung one is still open when the test looks, on a loaded machine.
    open_s = {"hung": 3.0, "slow": 1.0, "refusing": 1.0}
    for name, stand_in in backends.items():
        (repo / f"remote_{name}" / "1").mkdir(parents=True)
        (repo / f"remote_{name}" / "config.yaml").write_text(
            REMOTE.format(url=stand_in.url, failures=failures[name], open_s=open_s[name], timeout_ms=2000)
        )
    running = start_gateway(repo, tmp_path_factory.mktemp("faults_logs") / "gateway.log")
    yield running
    running.stop()


def infer(
    gateway: RunningGateway, model: str, timeout_ms: int | None = TIMEOUT_MS
) -> tuple[httpx.Response, float]:
    headers = {"X-Timeout-Ms": str(timeout_ms)} if timeout_ms is not None else {}
    started = time.monotonic()
    response = httpx.post(f"{gateway.url}/v2/models/{model}/infer", json=BODY, headers=headers, timeout=30)
    return response, time.monotonic() - started


def assert_doubled(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    np.testing.assert_array_equal(np.asarray(output["data"], np.float32).reshape(output["shape"]), X * 2)


def wait_until_serving(gateway: RunningGateway, model: str, within_s: float = 15) -> float:
    """Seconds until the model answers correctly again, with nobody doing anything but ask."""
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        response, _ = infer(gateway, model, timeout_ms=2000)
        if response.status_code == 200:
            assert_doubled(response)
            return time.monotonic() - started
        assert response.status_code in (503, 504), response.text
        time.sleep(0.2)
    raise AssertionError(f"{model} did not recover within {within_s}s")


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    text = httpx.get(f"{gateway.url}/metrics").text
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}\{{(.*)\}} (\S+)$", line)
        if match and all(f'{k}="{v}"' in match.group(1) for k, v in labels.items()):
            total += float(match.group(2))
    return total


def test_a_hung_backend_times_out_fast_opens_its_breaker_and_recovers(
    faulty_gateway: RunningGateway, backends: dict[str, FailingTorchServe]
) -> None:
    hung = backends["hung"]
    assert_doubled(infer(faulty_gateway, "remote_hung")[0])
    hung.mode = "hang"
    with SteadyLoad(f"{faulty_gateway.url}/v2/models/affine/infer") as others:
        for _ in range(3):  # resilience.failures
            response, elapsed = infer(faulty_gateway, "remote_hung")
            assert response.status_code == 504, response.text
            assert elapsed < TIMEOUT_MS / 1000 + SLACK_S
            assert response.headers["X-Request-ID"]
        # The deadline reached the backend call: the gateway hung up on every hung request.
        deadline = time.monotonic() + 5
        while hung.abandoned < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert hung.abandoned == hung.predictions - 1 == 3
        # Three failures in a row opened the breaker: the model reports not ready, and a request
        # is refused at once without reaching the backend.
        assert httpx.get(f"{faulty_gateway.url}/v2/models/remote_hung/ready").status_code == 503
        response, elapsed = infer(faulty_gateway, "remote_hung")
        assert response.status_code == 503 and elapsed < SLACK_S, response.text
        assert hung.predictions == 4
        assert metric(faulty_gateway, "modelyard_breaker_state", endpoint=hung.url) == 2
        hung.mode = "ok"
        recovered_s = wait_until_serving(faulty_gateway, "remote_hung")
    assert others.counts()[200] > 0 and set(others.counts()) == {200}, others.counts()
    assert others.wrong_answers() == 0
    assert metric(faulty_gateway, "modelyard_breaker_state", endpoint=hung.url) == 0
    assert metric(faulty_gateway, "modelyard_breaker_transitions_total", endpoint=hung.url, state="open") == 1
    assert (
        metric(faulty_gateway, "modelyard_deadline_exceeded_total", model="remote_hung", stage="backend") >= 3
    )
    assert (
        metric(faulty_gateway, "modelyard_rejected_requests_total", model="remote_hung", reason="unavailable")
        >= 1
    )
    assert recovered_s < 10
    log = faulty_gateway.output()
    assert "event=breaker_open" in log and "event=breaker_closed" in log
    assert re.search(r"event=timeout reason=backend request_id=\S+ model=remote_hung", log)


def test_a_slow_backend_gets_the_deadline_over_rest_and_grpc(
    faulty_gateway: RunningGateway, backends: dict[str, FailingTorchServe]
) -> None:
    slow = backends["slow"]
    slow.delay_s = 5.0
    try:
        # REST: the X-Timeout-Ms header.
        response, elapsed = infer(faulty_gateway, "remote_slow")
        assert response.status_code == 504 and elapsed < TIMEOUT_MS / 1000 + SLACK_S, response.text
        # The client's own request id comes back, on the error too.
        response = httpx.post(
            f"{faulty_gateway.url}/v2/models/remote_slow/infer",
            json=BODY,
            headers={"X-Timeout-Ms": str(TIMEOUT_MS), "X-Request-ID": "slow-1"},
        )
        assert response.status_code == 504 and response.headers["X-Request-ID"] == "slow-1"
        assert "request_id=slow-1 model=remote_slow" in faulty_gateway.output()
        # A client may not ask for more than the model's limits.timeout_ms (2 s here).
        response, elapsed = infer(faulty_gateway, "remote_slow", timeout_ms=60_000)
        assert response.status_code == 504 and 2.0 <= elapsed < 2.0 + SLACK_S, (response.text, elapsed)
        # gRPC: the client's deadline.
        client = triton_grpc.InferenceServerClient(faulty_gateway.grpc)
        tensor = triton_grpc.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(X)
        started = time.monotonic()
        with pytest.raises(InferenceServerException) as caught:
            client.infer("remote_slow", [tensor], client_timeout=TIMEOUT_MS / 1000)
        assert "DEADLINE_EXCEEDED" in str(caught.value.status())
        assert time.monotonic() - started < TIMEOUT_MS / 1000 + SLACK_S
        # Every one of those reached the backend with a timeout of its own: none ran on there.
        deadline = time.monotonic() + 5
        while slow.abandoned < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert slow.abandoned == slow.predictions == 4
    finally:
        slow.delay_s = 0.0
    result = client.infer("remote_slow", [tensor], client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)
    client.close()


def test_a_refusing_backend_is_retried_within_budget_then_503_then_recovers(
    faulty_gateway: RunningGateway, backends: dict[str, FailingTorchServe]
) -> None:
    refusing = backends["refusing"]
    assert_doubled(infer(faulty_gateway, "remote_refusing")[0])
    try:
        with SteadyLoad(f"{faulty_gateway.url}/v2/models/affine/infer") as others:
            # Refused right before the first request: the gateway's health probe (every few
            # seconds) would otherwise find it first and mark it not ready, with no call to retry.
            refusing.stop_listening()
            codes = []
            for _ in range(6):
                response, elapsed = infer(faulty_gateway, "remote_refusing", timeout_ms=2000)
                codes.append(response.status_code)
                assert elapsed < SLACK_S, elapsed
            assert set(codes) == {503}, codes
    finally:
        refusing.start_listening()
    assert set(others.counts()) == {200} and others.wrong_answers() == 0, others.counts()
    retries = metric(faulty_gateway, "modelyard_backend_retries_total", endpoint=refusing.url)
    assert 1 <= retries <= 4, retries
    # each would have been 12.
    assert 1 <= retries <= 4, retries
    assert "event=retry" in faulty_gateway.output()
    assert wait_until_serving(faulty_gateway, "remote_refusing") < 10


def test_health_and_other_models_are_untouched(faulty_gateway: RunningGateway) -> None:
    assert httpx.get(f"{faulty_gateway.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{faulty_gateway.url}/v2/models/affine/ready").status_code == 200
