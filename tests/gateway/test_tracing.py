"""Tracing in the data plane, with the SDK's in-memory exporter: the request span continues the
caller's trace, its phases are children of it, a batch wait sits under the backend call, and with
tracing off the SDK is never loaded."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.context import ContextBuilder, trace_parent
from gateway.errors import BackendError, BackendUnavailable, InvalidInput
from gateway.server import Gateway
from gateway.settings import Settings
from gateway.tracing import Tracer, current_trace
from gateway.types import Datatype, InferRequest, Tensor
from scripts.build_models import _save, build_affine

ROOT = Path(__file__).resolve().parent.parent.parent
TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CLIENT_SPAN = 0x00F067AA0BA902B7
TRACEPARENT = f"00-{TRACE_ID:032x}-{CLIENT_SPAN:016x}-01"


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[Gateway, InMemorySpanExporter]]:
    repo = tmp_path / "repo"
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    _save(build_affine(1), repo / "batched" / "1" / "model.onnx")
    (repo / "batched" / "config.yaml").write_text(
        "batching: {max_batch_size: 8, max_queue_delay_us: 20000}\n"
    )
    (repo / "affine" / "config.yaml").write_text("fallback: [batched]\n")
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    gateway = Gateway(Settings(model_repo=repo))
    gateway.dataplane.tracer = Tracer(provider)
    await gateway.dataplane.load_all()
    yield gateway, exporter
    await gateway.registry.aclose()
    provider.shutdown()


def request(model: str, rows: int = 2) -> tuple[InferRequest, np.ndarray[Any, Any]]:
    x = np.random.default_rng(rows).standard_normal((rows, 4)).astype(np.float32)
    return InferRequest(model, None, [Tensor("x", Datatype.FP32, x.shape, x)]), x


def expected(repo: Path, model: str, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    return np.asarray(session.run(["y"], {"x": x})[0])


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


async def test_request_span_continues_the_callers_trace(traced: Any) -> None:
    gateway, exporter = traced
    infer, x = request("affine")
    context = ContextBuilder().build("rest", {"traceparent": TRACEPARENT, "x-request-id": "r-1"})
    response = await gateway.dataplane.infer(infer, context)
    np.testing.assert_allclose(response.outputs[0].data, expected(gateway.settings.model_repo, "affine", x))

    spans = by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /v2/models/{model_name}/infer", "queue", "backend_call"}
    root = spans["POST /v2/models/{model_name}/infer"]
    assert root.kind == SpanKind.SERVER
    assert root.context is not None and root.parent is not None
    assert root.context.trace_id == TRACE_ID
    assert root.parent.span_id == CLIENT_SPAN and root.parent.is_remote
    assert dict(root.attributes or {}) == {
        "modelyard.protocol": "rest",
        "modelyard.request_id": "r-1",
        "modelyard.model": "affine",
        "modelyard.model_version": "1",
        "modelyard.backend": "onnxruntime",
        "modelyard.status": "200",
    }
    for name in ("queue", "backend_call"):
        child = spans[name]
        assert child.parent is not None and child.parent.span_id == root.context.span_id
        assert root.start_time is not None and root.end_time is not None
        assert child.start_time is not None and child.end_time is not None
        assert root.start_time <= child.start_time <= child.end_time <= root.end_time
    assert spans["queue"].end_time == spans["backend_call"].start_time


async def test_a_request_without_traceparent_starts_its_own_trace(traced: Any) -> None:
    gateway, exporter = traced
    await gateway.dataplane.infer(request("affine")[0], ContextBuilder().build("grpc", {}))
    root = by_name(exporter.get_finished_spans())["inference.GRPCInferenceService/ModelInfer"]
    assert root.parent is None
    assert root.context is not None and root.context.trace_id != TRACE_ID


async def test_batch_wait_is_marked_under_the_backend_call(traced: Any) -> None:
    gateway, exporter = traced
    builder = ContextBuilder()
    (first, _), (second, _) = request("batched", 1), request("batched", 3)
    await asyncio.gather(
        gateway.dataplane.infer(first, builder.build("rest", {"traceparent": TRACEPARENT})),
        gateway.dataplane.infer(second, builder.build("rest", {"traceparent": TRACEPARENT})),
    )
    spans = exporter.get_finished_spans()
    waits = [s for s in spans if s.name == "batch_wait"]
    calls = {s.context.span_id: s for s in spans if s.name == "backend_call" and s.context is not None}
    assert len(waits) == 2 and len(calls) == 2
    for wait in waits:
        assert wait.parent is not None and wait.parent.span_id in calls
        assert dict(wait.attributes or {})["modelyard.batch.rows"] == 4
    assert sorted(dict(w.attributes or {})["modelyard.request.rows"] for w in waits) == [1, 3]


async def test_a_refused_request_ends_its_span_with_the_error(traced: Any) -> None:
    gateway, exporter = traced
    bad = InferRequest("affine", None, [Tensor("nope", Datatype.FP32, (1, 4), np.zeros((1, 4), np.float32))])
    with pytest.raises(InvalidInput):
        await gateway.dataplane.infer(bad, ContextBuilder().build("grpc", {"traceparent": TRACEPARENT}))
    root = by_name(exporter.get_finished_spans())["inference.GRPCInferenceService/ModelInfer"]
    assert root.status.status_code == StatusCode.ERROR
    assert dict(root.attributes or {})["modelyard.status"] == "INVALID_ARGUMENT"


async def test_a_fallback_after_a_failed_backend_call_is_not_its_child(
    traced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, exporter = traced
    adapter = gateway.registry.get("affine").versions[1].adapter

    async def down(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable("the backend is down")

    monkeypatch.setattr(adapter, "infer", down)
    infer, x = request("affine")
    response = await gateway.dataplane.infer(infer, ContextBuilder().build("rest", {}))
    assert response.parameters["deployment"] == "batched"
    np.testing.assert_allclose(response.outputs[0].data, expected(gateway.settings.model_repo, "batched", x))
    spans = exporter.get_finished_spans()
    # The fallback runs untraced: its batching wrapper finds no trace to mark a wait in.
    assert [s.name for s in spans if s.name == "batch_wait"] == []
    (call,) = [s for s in spans if s.name == "backend_call"]
    assert call.status.status_code == StatusCode.ERROR
    root = by_name(spans)["POST /v2/models/{model_name}/infer"]
    assert dict(root.attributes or {})["modelyard.model"] == "batched"


async def test_a_failed_backend_call_ends_failed_and_leaves_no_trace_behind(
    traced: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gateway, exporter = traced
    adapter = gateway.registry.get("affine").versions[1].adapter

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise BackendError("the backend broke")

    monkeypatch.setattr(adapter, "infer", failing)
    with pytest.raises(BackendError):
        await gateway.dataplane.infer(request("affine")[0], ContextBuilder().build("rest", {}))
    assert current_trace.get() is None
    spans = by_name(exporter.get_finished_spans())
    call, root = spans["backend_call"], spans["POST /v2/models/{model_name}/infer"]
    assert call.status.status_code == root.status.status_code == StatusCode.ERROR
    assert call.end_time is not None and root.end_time is not None and call.end_time <= root.end_time
    assert dict(root.attributes or {})["modelyard.status"] == "500"


@pytest.mark.parametrize(
    "value",
    [
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # an all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # an all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the invalid version
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has 4 fields
        "garbage",
    ],
)
def test_an_invalid_traceparent_is_ignored(value: str) -> None:
    assert trace_parent(value) is None


def test_a_later_version_traceparent_is_read_by_its_first_fields() -> None:
    parsed = trace_parent(f"01-{TRACE_ID:032x}-{CLIENT_SPAN:016x}-01-more", "vendor=x")
    assert parsed is not None
    assert (parsed.trace_id, parsed.span_id, parsed.flags, parsed.state) == (
        TRACE_ID,
        CLIENT_SPAN,
        1,
        "vendor=x",
    )


def test_tracing_is_off_by_default_and_never_loads_the_sdk(tmp_path: Path) -> None:
    """A gateway with no OTEL_* variables serves a request without loading the SDK. (FastAPI
    imports the OpenTelemetry API itself; its own telemetry stays off while no global provider
    is set, and the gateway never sets one.)"""
    repo = tmp_path / "repo"
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    script = f"""
import asyncio, json, sys
import numpy as np
from gateway.context import ContextBuilder
from gateway.server import Gateway
from gateway.settings import Settings
from gateway.types import Datatype, InferRequest, Tensor

async def main():
    gateway = Gateway(Settings(model_repo={str(repo)!r}))
    await gateway.dataplane.load_all()
    x = np.ones((1, 4), np.float32)
    context = ContextBuilder().build("rest", {{"traceparent": {TRACEPARENT!r}}})
    await gateway.dataplane.infer(InferRequest("affine", None, [Tensor("x", Datatype.FP32, x.shape, x)]), context)
    await gateway.registry.aclose()
    print(json.dumps([gateway.dataplane.tracer is None, sorted(m for m in sys.modules if m.startswith("opentelemetry.sdk"))]))

asyncio.run(main())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    off, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert off is True
    assert modules == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "unknown exporter"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ],
)
def test_an_exporter_the_gateway_cannot_use_is_refused(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        Tracer.from_settings(Settings())


def test_otel_sdk_disabled_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Tracer.from_settings(Settings()) is None
