"""Payload logging against a real HTTP sink this test runs and a real JSONL file: KServe's
CloudEvents, tensors summarised past their size cap, redaction, sampling, rotation, and a slow or
dead sink that drops and counts but never holds up an answer."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from pydantic import ValidationError

from gateway.config import ModelConfig, PayloadLog
from gateway.context import ContextBuilder
from gateway.net import free_port
from gateway.payload_log import RotatingFile, tensor_json
from gateway.server import Gateway
from gateway.settings import Settings
from gateway.types import Datatype, InferRequest, Tensor
from scripts.build_models import _save, build_affine
from tests.support.model_builders import build_identity

WAIT_S = 20


class Sink(http.server.ThreadingHTTPServer):
    """Records each POST's headers and body; `hold` makes it wait before it answers."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _SinkHandler)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.arrived = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/events"


class _SinkHandler(http.server.BaseHTTPRequestHandler):
    server: Sink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.arrived.set()
        self.server.hold.wait(WAIT_S)
        self.server.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[Sink]:
    server = Sink()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.hold.set()
    server.shutdown()
    server.server_close()


async def started(repo: Path) -> Gateway:
    gateway = Gateway(Settings(model_repo=repo))
    await gateway.dataplane.load_all()
    return gateway


async def stopped(gateway: Gateway) -> None:
    await gateway.registry.aclose()
    assert gateway.dataplane.payloads is not None
    await gateway.dataplane.payloads.aclose()


def affine_repo(tmp_path: Path, payload_log: str) -> Path:
    repo = tmp_path / "repo"
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    (repo / "affine" / "config.yaml").write_text(f"payload_log: {payload_log}\n")
    return repo


def affine_request(rows: int, seed: int = 0) -> tuple[InferRequest, np.ndarray[Any, Any]]:
    x = np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)
    return InferRequest("affine", None, [Tensor("x", Datatype.FP32, x.shape, x)]), x


def dropped(gateway: Gateway, reason: str) -> float:
    labels = {"model": "affine", "reason": reason}
    return gateway.metrics.registry.get_sample_value("modelyard_payload_log_dropped_total", labels) or 0.0


def logged(gateway: Gateway, kind: str, sink: str) -> float:
    labels = {"model": "affine", "type": kind, "sink": sink}
    return gateway.metrics.registry.get_sample_value("modelyard_payload_log_events_total", labels) or 0.0


async def test_requests_and_responses_reach_both_sinks_as_kserve_cloudevents(
    tmp_path: Path, sink: Sink
) -> None:
    file = tmp_path / "logs" / "affine.jsonl"
    # The input (2x4 FP32, 32 bytes) passes the 24-byte cap and is summarised; the output (24) is not.
    repo = affine_repo(tmp_path, f"{{sink: {sink.url!r}, path: {str(file)!r}, max_tensor_bytes: 24}}")
    gateway = await started(repo)
    request, x = affine_request(2)
    context = ContextBuilder().build("rest", {"x-request-id": "req-7"})
    response = await gateway.dataplane.infer(request, context)
    await stopped(gateway)  # closing waits for the queued events

    session = ort.InferenceSession(str(repo / "affine" / "1" / "model.onnx"))
    y = session.run(["y"], {"x": x})[0]
    np.testing.assert_allclose(response.outputs[0].data, y)
    expected = {
        "org.kubeflow.serving.inference.request": {
            "id": "req-7",
            "model_name": "affine",
            "model_version": "1",
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "summary": {"bytes": 32, "sha256": hashlib.sha256(x.tobytes()).hexdigest()},
                }
            ],
        },
        "org.kubeflow.serving.inference.response": {
            "id": "req-7",
            "model_name": "affine",
            "model_version": "1",
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [2, 3], "data": y.ravel().tolist()}],
        },
    }

    assert len(sink.received) == 2
    for headers, body in sink.received:
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-id"] == "req-7"
        assert headers["ce-source"] == "modelyard"
        assert headers["ce-inferenceservicename"] == "affine"
        assert headers["content-type"] == "application/json"
        assert json.loads(body) == expected[headers["ce-type"]]
    assert {h["ce-type"] for h, _ in sink.received} == set(expected)

    lines = [json.loads(line) for line in file.read_text().splitlines()]
    assert [e["type"] for e in lines] == list(expected)
    for event in lines:
        assert (event["specversion"], event["id"], event["source"]) == ("1.0", "req-7", "modelyard")
        assert event["datacontenttype"] == "application/json"
        assert event["data"] == expected[event["type"]]
    assert logged(gateway, "request", "http") == logged(gateway, "response", "file") == 1


async def test_redacted_names_keep_their_shape_and_lose_their_data(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    _save(build_identity(Datatype.BYTES), repo / "identity" / "1" / "model.onnx")
    file = tmp_path / "identity.jsonl"
    (repo / "identity" / "config.yaml").write_text(
        f"payload_log: {{path: {str(file)!r}, redact: [OUTPUT]}}\n"
    )
    gateway = await started(repo)
    text = np.array([[b"secret", "caf\u00e9".encode()]], dtype=object)
    request = InferRequest("identity", None, [Tensor("INPUT", Datatype.BYTES, (1, 2), text)])
    await gateway.dataplane.infer(request, ContextBuilder().build("grpc", {}))
    await stopped(gateway)
    request_event, response_event = (json.loads(line) for line in file.read_text().splitlines())
    assert request_event["data"]["inputs"] == [
        {"name": "INPUT", "datatype": "BYTES", "shape": [1, 2], "data": ["secret", "caf\u00e9"]}
    ]
    assert response_event["data"]["outputs"] == [
        {"name": "OUTPUT", "datatype": "BYTES", "shape": [1, 2], "redacted": True}
    ]
    assert b"secret" not in file.read_bytes().split(b"\n")[1]


async def test_sampling_logs_a_share_of_requests(tmp_path: Path) -> None:
    file = tmp_path / "sampled.jsonl"
    gateway = await started(affine_repo(tmp_path, f"{{path: {str(file)!r}, sample: 0.3, mode: request}}"))
    for seed in range(200):
        await gateway.dataplane.infer(affine_request(1, seed)[0], ContextBuilder().build("rest", {}))
    await stopped(gateway)
    events = [json.loads(line) for line in file.read_text().splitlines()]
    assert {e["type"] for e in events} == {"org.kubeflow.serving.inference.request"}
    # Binomial(200, 0.3): mean 60, standard deviation 6.5; the bounds are over 5 deviations out.
    assert 25 <= len(events) <= 95


async def test_a_slow_sink_drops_and_counts_and_never_holds_up_an_answer(tmp_path: Path, sink: Sink) -> None:
    file = tmp_path / "slow.jsonl"
    gateway = await started(affine_repo(tmp_path, f"{{sink: {sink.url!r}, path: {str(file)!r}, queue: 2}}"))
    sink.hold.clear()  # the sink takes the first event and answers only when the test says
    contexts = ContextBuilder()
    await gateway.dataplane.infer(affine_request(1)[0], contexts.build("rest", {}))
    assert await asyncio.to_thread(sink.arrived.wait, WAIT_S)
    # With the sink holding the first event, every further request is still answered.
    answers = [
        await gateway.dataplane.infer(affine_request(1, n)[0], contexts.build("rest", {})) for n in range(10)
    ]
    assert len(answers) == 10 and not sink.received
    # Two wait in the queue; the other eight pairs of events were dropped.
    assert dropped(gateway, "queue_full") == 16
    sink.hold.set()
    await stopped(gateway)
    assert len(sink.received) == 6
    assert len(file.read_text().splitlines()) == 6


async def test_a_dead_sink_counts_its_losses_and_the_file_still_gets_every_event(tmp_path: Path) -> None:
    file = tmp_path / "dead.jsonl"
    dead = f"http://127.0.0.1:{free_port()}/"
    gateway = await started(affine_repo(tmp_path, f"{{sink: {dead!r}, path: {str(file)!r}}}"))
    for seed in range(3):
        await gateway.dataplane.infer(affine_request(1, seed)[0], ContextBuilder().build("grpc", {}))
    await stopped(gateway)
    assert dropped(gateway, "sink_error") == 6
    assert len(file.read_text().splitlines()) == 6
    assert logged(gateway, "request", "http") == 0


def test_the_file_rotates_by_size_and_keeps_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    file = RotatingFile(path, max_bytes=1024, backups=2)
    lines = [json.dumps({"n": n, "pad": "p" * 300}).encode() + b"\n" for n in range(12)]
    for line in lines:
        file.write([line])
    file.close()
    kept = [path.with_name("x.jsonl.2"), path.with_name("x.jsonl.1"), path]
    assert all(p.stat().st_size <= 1024 for p in kept)
    assert not path.with_name("x.jsonl.3").exists()
    written = b"".join(p.read_bytes() for p in kept)
    assert written == b"".join(lines[-len(written.splitlines()) :])
    assert len(written.splitlines()) == 9  # three lines of ~320 bytes a file


def test_a_tensor_is_summarised_only_past_its_cap() -> None:
    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    tensor = Tensor("t", Datatype.INT64, (2, 3), array)
    assert tensor_json(tensor, PayloadLog(path="x", max_tensor_bytes=48))["data"] == [0, 1, 2, 3, 4, 5]
    summary = tensor_json(tensor, PayloadLog(path="x", max_tensor_bytes=47))["summary"]
    assert summary == {"bytes": 48, "sha256": hashlib.sha256(array.tobytes()).hexdigest()}


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"sample": 0.5}, "needs a sink"),
        ({"sink": "ftp://logs/"}, "http:// or https://"),
        ({"path": "x.jsonl", "sample": 1.5}, "less than or equal to 1"),
        ({"path": "x.jsonl", "sinks": "x"}, "Extra inputs"),
    ],
)
def test_a_bad_payload_log_section_is_refused(section: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        ModelConfig.model_validate({"payload_log": section})
