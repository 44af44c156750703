"""A backend call made for a traced request carries its backend_call span on as `traceparent`;
one made outside a traced request carries none. Checked against a small HTTP server that records
the headers it gets, standing in for TorchServe's inference API. (The v2 backend is checked end to
end against a second gateway in tests/gateway/test_tracing_otlp.py.)"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.torchserve.client import TorchServeClient
from gateway.context import ContextBuilder
from gateway.net import free_port
from gateway.tracing import Tracer, current_trace, format_traceparent

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Recorder(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", free_port()), _Handler)
        self.headers: list[dict[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Recorder
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.headers.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    server = Recorder()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


async def test_torchserve_calls_carry_the_backend_call_span(recorder: Recorder) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    client = TorchServeClient(recorder.url, None, None, None, 10.0)
    try:
        assert await client.predict("m", "m", None, b"x", None) == b"ok"
        context = ContextBuilder().build("rest", {"traceparent": TRACEPARENT})
        trace = Tracer(provider).start(context, time.perf_counter_ns())
        trace.begin_backend_call("torchserve", time.perf_counter_ns())
        token = current_trace.set(trace)
        try:
            assert await client.predict("m", "m", "1", b"x", None) == b"ok"
        finally:
            current_trace.reset(token)
        trace.end_backend_call(time.perf_counter_ns(), failed=False)
        trace.finish("m", "1", "torchserve", "200", None)
    finally:
        await client.inference.close()
        await client.management.aclose()
    untraced, traced = recorder.headers
    assert "traceparent" not in untraced
    (call,) = [s for s in exporter.get_finished_spans() if s.name == "backend_call"]
    assert call.context is not None
    assert traced["traceparent"] == format_traceparent(call.context.trace_id, call.context.span_id, 1)
    assert traced["traceparent"].split("-")[1] == TRACEPARENT.split("-")[1]
    provider.shutdown()
