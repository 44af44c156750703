"""Traces over OTLP/HTTP, end to end: two gateway processes export to a receiver this test runs,
which decodes the protobuf ExportTraceServiceRequest. A client's v2 request (REST and gRPC) with a
traceparent reaches the front gateway, whose v2 backend (REST and gRPC) is the back gateway: one
trace crosses both."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from gateway.net import free_port
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import v2_config

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPANS = {"rest": "b7ad6b7169203331", "grpc": "c8be7c827a314442"}
WAIT_S = 30


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any]


class Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def wait_for(self, trace_id: str, count: int) -> list[ReceivedSpan]:
        until = time.monotonic() + WAIT_S
        while time.monotonic() < until:
            with self.lock:
                found = [s for s in self.spans if s.trace_id == trace_id]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        raise AssertionError(f"{len(found)} spans of trace {trace_id} arrived, not {count}: {found}")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        spans = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: _value(a.value) for a in span.attributes}
                    spans.append(
                        ReceivedSpan(
                            resource["service.name"],
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            attributes,
                        )
                    )
        with self.server.lock:
            self.server.spans.extend(spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def otel_env(receiver: Receiver, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": service,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


@pytest.fixture(scope="module")
def gateways(
    receiver: Receiver, small_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningGateway, RunningGateway]]:
    logs = tmp_path_factory.mktemp("traced_logs")
    back = start_gateway(small_repo, logs / "back.log", env=otel_env(receiver, "back"))
    repo = tmp_path_factory.mktemp("traced_front")
    for protocol, address in (("rest", back.url), ("grpc", back.grpc)):
        (repo / f"affine_{protocol}" / "1").mkdir(parents=True)
        (repo / f"affine_{protocol}" / "config.yaml").write_text(v2_config("affine", address, protocol))
    front = start_gateway(repo, logs / "front.log", env=otel_env(receiver, "front"))
    yield front, back
    front.stop()
    back.stop()
    for running in (front, back):
        assert "Traceback" not in running.output(), running.output()[-3000:]


def send(front: RunningGateway, client: str, backend: str, traceparent: str) -> None:
    """A client's v2 request, over `client` (rest or grpc), to the model the front serves over
    `backend`; its answer is the back gateway's affine model's, which the test computes there."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    model = f"affine_{backend}"
    direct = httpx.post(
        f"{front.url}/v2/models/{model}/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.ravel().tolist()}]},
        headers={"traceparent": traceparent} if client == "rest" else {},
        timeout=30,
    )
    assert direct.status_code == 200, direct.text
    if client == "grpc":
        with triton_grpc.InferenceServerClient(front.grpc) as grpc_client:
            tensor = triton_grpc.InferInput("x", [2, 4], "FP32")
            tensor.set_data_from_numpy(x)
            answer = grpc_client.infer(model, [tensor], headers={"traceparent": traceparent})
            np.testing.assert_allclose(
                answer.as_numpy("y"), np.asarray(direct.json()["outputs"][0]["data"]).reshape(2, 3)
            )


@pytest.mark.parametrize(("client", "backend"), [("rest", "grpc"), ("grpc", "rest")])
def test_a_trace_crosses_the_gateway(
    gateways: tuple[RunningGateway, RunningGateway], receiver: Receiver, client: str, backend: str
) -> None:
    front, _ = gateways
    trace_id = TRACE_ID[:-2] + ("01" if client == "rest" else "02")
    client_span = CLIENT_SPANS[client]
    send(front, client, backend, f"00-{trace_id}-{client_span}-01")

    # front: server span, queue, backend_call; back: server span, queue, backend_call.
    spans = receiver.wait_for(trace_id, 6)
    front_spans = {s.name: s for s in spans if s.service == "front"}
    back_spans = {s.name: s for s in spans if s.service == "back"}
    front_name = {
        "rest": "POST /v2/models/{model_name}/infer",
        "grpc": "inference.GRPCInferenceService/ModelInfer",
    }
    root = front_spans[front_name[client]]
    assert root.parent_span_id == client_span
    assert root.kind == 2  # SPAN_KIND_SERVER
    assert root.attributes == {
        "modelyard.protocol": client,
        "modelyard.request_id": root.attributes["modelyard.request_id"],
        "modelyard.model": f"affine_{backend}",
        "modelyard.model_version": "1",
        "modelyard.backend": "v2",
        "modelyard.status": "200" if client == "rest" else "OK",
    }
    assert front_spans["queue"].parent_span_id == root.span_id
    call = front_spans["backend_call"]
    assert call.parent_span_id == root.span_id

    # The back gateway's request span is the child of the front's backend call.
    remote = back_spans[front_name[backend]]
    assert remote.parent_span_id == call.span_id
    assert remote.attributes["modelyard.model"] == "affine"
    assert remote.attributes["modelyard.backend"] == "onnxruntime"
    assert back_spans["backend_call"].parent_span_id == remote.span_id
