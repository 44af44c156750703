"""Triton's streaming inference (ModelStreamInfer) through tritonclient.grpc's start_stream and
async_stream_infer, against the session gateway; outputs checked against onnxruntime run directly."""

from __future__ import annotations

import queue
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from tests.gateway.test_errors import wait_for_inflight
from tests.gateway.test_infer import RNG_SEED, reference
from tests.support import RunningGateway

Answer = tuple[Any, InferenceServerException | None]


class Stream:
    """One client stream; its callback's answers in arrival order."""

    def __init__(
        self, client: triton_grpc.InferenceServerClient, headers: dict[str, str] | None = None
    ) -> None:
        self.client = client
        self.answers: queue.Queue[Answer] = queue.Queue()
        client.start_stream(callback=lambda result, error: self.answers.put((result, error)), headers=headers)

    def send(self, model: str, name: str, data: np.ndarray[Any, Any], datatype: str, request_id: str) -> None:
        tensor = triton_grpc.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        self.client.async_stream_infer(model, [tensor], request_id=request_id)

    def receive(self, count: int) -> list[Answer]:
        return [self.answers.get(timeout=60) for _ in range(count)]


@pytest.fixture
def stream(gateway: RunningGateway) -> Any:
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    opened = Stream(client)
    yield opened
    client.stop_stream()
    client.close()


def _request_id(answer: Answer) -> str:
    result, error = answer
    assert error is None, error
    return str(result.get_response().id)


def test_one_stream_serves_several_models(stream: Stream, test_repo: Path) -> None:
    rng = np.random.default_rng(RNG_SEED)
    feeds = {
        f"affine-{i}": ("affine", "x", rng.standard_normal((i + 1, 4)).astype(np.float32)) for i in range(4)
    }
    feeds |= {f"mlp-{i}": ("mlp", "input", rng.standard_normal((3, 64)).astype(np.float32)) for i in range(4)}
    for request_id, (model, name, data) in feeds.items():
        stream.send(model, name, data, "FP32", request_id)
    answers = {_request_id(a): a[0] for a in stream.receive(len(feeds))}
    assert set(answers) == set(feeds)
    for request_id, (model, name, data) in feeds.items():
        output = "y" if model == "affine" else "logits"
        result = answers[request_id]
        served = int(result.get_response().model_version)
        (expected,) = reference(test_repo, model, served, {name: data})
        np.testing.assert_allclose(result.as_numpy(output), expected, rtol=1e-5, atol=1e-6)
        assert result.get_response().model_name == model


def test_an_error_is_a_response_and_the_stream_goes_on(stream: Stream, test_repo: Path) -> None:
    x = np.random.default_rng(RNG_SEED).standard_normal((2, 4)).astype(np.float32)
    stream.send("affine", "x", x, "FP32", "before")
    (first,) = stream.receive(1)
    assert _request_id(first) == "before"

    stream.send("no_such_model", "x", x, "FP32", "unknown")
    (failed,) = stream.receive(1)
    result, error = failed
    assert result is None and error is not None
    assert "Request for unknown model" in error.message()
    assert "no_such_model" in error.message()

    stream.send("affine", "wrong_name", x, "FP32", "bad-input")
    for index in range(3):
        stream.send("affine", "x", x, "FP32", f"after-{index}")
    answers = stream.receive(4)
    errors = [e for _, e in answers if e is not None]
    assert len(errors) == 1 and "wrong_name" in errors[0].message()
    after = [a for a in answers if a[1] is None]
    assert sorted(_request_id(a) for a in after) == ["after-0", "after-1", "after-2"]
    for result, _ in after:
        version = int(result.get_response().model_version)
        (expected,) = reference(test_repo, "affine", version, {"x": x})
        np.testing.assert_allclose(result.as_numpy("y"), expected, rtol=1e-6)


def test_requests_on_one_stream_run_concurrently(
    stream: Stream, gateway: RunningGateway, http: httpx.Client
) -> None:
    """spin_limited runs one request at a time and queues none: while the stream's first request
    holds the slot, its second is refused at once, and the refusal comes back first. A stream that
    ran its requests one after another would answer both, in order."""
    # About 2 s of one core (6000 x 6000 matrix product): 3000 took 0.26 s on this VM, short enough
    # for the slot to come free before the second request arrived under a loaded CI run.
    stream.send("spin_limited", "n", np.array([6000], dtype=np.int64), "INT64", "long")
    wait_for_inflight(http, "spin_limited", 1)
    stream.send("spin_limited", "n", np.array([1], dtype=np.int64), "INT64", "short")
    (first, second) = stream.receive(2)
    assert first[0] is None and first[1] is not None
    assert "limit" in first[1].message()
    assert _request_id(second) == "long"


def test_each_streamed_request_goes_by_its_own_id(gateway: RunningGateway) -> None:
    """The stream's X-Request-ID would name all its requests: the log names each by its own id."""
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    stream = Stream(client, headers={"x-request-id": "the-stream-header"})
    try:
        stream.send("spin_deadline", "n", np.array([3000], dtype=np.int64), "INT64", "streamed-own-id")
        ((result, error),) = stream.receive(1)
        assert result is None and error is not None and "deadline" in error.message()
    finally:
        client.stop_stream()
        client.close()
    output = gateway.output()
    assert "request_id=streamed-own-id" in output
    assert "request_id=the-stream-header" not in output


def test_the_stream_counts_in_the_request_metrics(stream: Stream, http: httpx.Client) -> None:
    line = 'modelyard_requests_total{backend="onnxruntime",code="OK",model="mlp",protocol="grpc",version="1"}'

    def counted() -> float:
        for row in http.get("/metrics").text.splitlines():
            if row.startswith(line):
                return float(row.rsplit(" ", 1)[1])
        return 0.0

    before = counted()
    data = np.zeros((1, 64), dtype=np.float32)
    for index in range(3):
        stream.send("mlp", "input", data, "FP32", f"m-{index}")
    assert all(error is None for _, error in stream.receive(3))
    assert counted() == before + 3


@pytest.fixture(scope="module")
def one_at_a_time(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A gateway whose streams run one request at a time (MODELYARD_GRPC_STREAM_MAX_INFLIGHT=1)."""
    from scripts.build_models import _save, build_affine
    from tests.support import start_gateway
    from tests.support.model_builders import build_spin

    repo = tmp_path_factory.mktemp("stream_bound")
    _save(build_spin(), repo / "spin" / "1" / "model.onnx")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    running = start_gateway(
        repo,
        tmp_path_factory.mktemp("stream_bound_log") / "gateway.log",
        env={"MODELYARD_GRPC_STREAM_MAX_INFLIGHT": "1"},
    )
    yield running
    assert running.stop() == 0


def test_a_stream_runs_no_more_requests_at_once_than_its_bound(one_at_a_time: RunningGateway) -> None:
    """With a bound of one, a quick request sent behind a long one is answered after it: the
    stream does not read it before the long one's answer is sent."""
    client = triton_grpc.InferenceServerClient(one_at_a_time.grpc)
    stream = Stream(client)
    try:
        stream.send("spin", "n", np.array([1500], dtype=np.int64), "INT64", "long")
        stream.send("affine", "x", np.ones((1, 4), dtype=np.float32), "FP32", "quick")
        assert [_request_id(answer) for answer in stream.receive(2)] == ["long", "quick"]
    finally:
        client.stop_stream()
        client.close()
