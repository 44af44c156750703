"""Per-request timing: REST answers carry Server-Timing; gRPC answers carry it in trailing metadata
when the call asks (or the gateway is set to always send it), and each answer of a ModelStreamInfer
stream in its `server_timing` parameter when the stream asks; the phases are in /metrics."""

from __future__ import annotations

import itertools
import queue
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from gateway.timing import PHASES, RequestTiming
from scripts.build_models import _save, build_affine, build_mlp
from tests.support import RunningGateway, float_tensor_proto, start_gateway
from tests.support.model_builders import MLP_BATCHED

PHASE = re.compile(r"^(?P<name>[a-z]+);dur=(?P<ms>\d+\.\d{3})$")


def phases(value: str) -> dict[str, float]:
    """A Server-Timing value as {metric name: milliseconds}, each entry checked for its form."""
    found = {}
    for entry in value.split(", "):
        match = PHASE.match(entry)
        assert match, f"not a Server-Timing entry: {entry!r} in {value!r}"
        found[match["name"]] = float(match["ms"])
    return found


def test_the_value_names_each_phase_gone_through_in_order() -> None:
    # Every mix of the phases and the total, each with its own duration.
    fields = [*(f"{phase}_ns" for phase in PHASES), "total_ns"]
    for present in itertools.product([False, True], repeat=len(fields)):
        values = {
            field: 1_234_567 * (i + 1)
            for i, (field, there) in enumerate(zip(fields, present, strict=True))
            if there
        }
        value = RequestTiming(**values).header()
        names = [field.removesuffix("_ns") for field in fields if field in values]
        if not names:
            assert value == ""
            continue
        assert list(phases(value)) == names, value
        for name, ms in phases(value).items():
            assert ms == round(values[f"{name}_ns"] / 1e6, 3), value


def rest_infer(url: str, model: str, name: str, rows: int, width: int) -> httpx.Response:
    body = {
        "inputs": [{"name": name, "datatype": "FP32", "shape": [rows, width], "data": [0.5] * (rows * width)}]
    }
    response = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response


def grpc_infer(address: str, model: str, name: str, rows: int, width: int, ask: bool) -> dict[str, str]:
    """One ModelInfer through the generated stub; its trailing metadata."""
    request = service_pb2.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype="FP32", shape=[rows, width])
    request.raw_input_contents.append(np.full((rows, width), 0.5, dtype=np.float32).tobytes())
    metadata = (("x-server-timing", "true"),) if ask else ()
    with grpc.insecure_channel(address) as channel:
        _, call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, metadata=metadata, timeout=60
        )
    return dict(call.trailing_metadata() or ())


def check_phases(found: dict[str, float], expected: set[str]) -> None:
    assert set(found) == expected | {"total"}, found
    assert all(ms >= 0 for ms in found.values()), found
    # The total spans every phase and the steps between them.
    assert found["total"] >= sum(ms for name, ms in found.items() if name != "total") - 0.003 * len(found)


@pytest.fixture(scope="module")
def timing_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """affine, and mlp_batched (which waits up to 2 ms for company), on a gateway of their own so
    other tests' counts of them stay their own."""
    repo = tmp_path_factory.mktemp("timing_repo")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    _save(build_mlp(), repo / "mlp_batched" / "1" / "model.onnx")
    (repo / "mlp_batched" / "config.yaml").write_text(MLP_BATCHED)
    running = start_gateway(repo, tmp_path_factory.mktemp("timing") / "gateway.log")
    yield running
    assert running.stop() == 0


def test_a_rest_answer_says_where_its_time_went(timing_gateway: RunningGateway) -> None:
    response = rest_infer(timing_gateway.url, "affine", "x", 2, 4)
    check_phases(phases(response.headers["Server-Timing"]), {"decode", "queue", "backend", "encode"})


def test_a_rest_answer_names_no_server_stack(timing_gateway: RunningGateway) -> None:
    # No `server: uvicorn`, on the infer fast path or elsewhere; the Date an origin server owes stays.
    answers = [rest_infer(timing_gateway.url, "affine", "x", 2, 4), httpx.get(f"{timing_gateway.url}/v2")]
    for response in answers:
        assert response.status_code == 200
        assert "server" not in response.headers and "date" in response.headers


def test_a_batched_request_has_its_batch_wait(timing_gateway: RunningGateway) -> None:
    """mlp_batched waits up to 2 ms for company: its answers have a batch phase, others none."""
    response = rest_infer(timing_gateway.url, "mlp_batched", "input", 1, 64)
    found = phases(response.headers["Server-Timing"])
    check_phases(found, {"decode", "queue", "batch", "backend", "encode"})


def test_a_tf_serving_rest_answer_has_the_same_timing(timing_gateway: RunningGateway) -> None:
    response = httpx.post(
        f"{timing_gateway.url}/v1/models/affine:predict",
        json={"instances": [[1.0, 2.0, 3.0, 4.0]]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    check_phases(phases(response.headers["Server-Timing"]), {"decode", "queue", "backend", "encode"})


def test_an_error_has_no_timing(timing_gateway: RunningGateway) -> None:
    response = httpx.post(
        f"{timing_gateway.url}/v2/models/affine/infer",
        json={"inputs": [{"name": "nope", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]},
    )
    assert response.status_code == 400
    assert "server-timing" not in response.headers


def test_grpc_sends_timing_only_when_the_call_asks(timing_gateway: RunningGateway) -> None:
    plain = grpc_infer(timing_gateway.grpc, "affine", "x", 2, 4, ask=False)
    assert "server-timing" not in plain and "x-request-id" in plain
    asked = grpc_infer(timing_gateway.grpc, "affine", "x", 2, 4, ask=True)
    check_phases(phases(asked["server-timing"]), {"decode", "queue", "backend", "encode"})


def _phase_count(text: str, model: str, protocol: str, phase: str) -> float:
    for line in text.splitlines():
        if (
            line.startswith("modelyard_request_phase_seconds_count{")
            and f'model="{model}"' in line
            and f'protocol="{protocol}"' in line
            and f'phase="{phase}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_the_phases_are_histograms_in_metrics(timing_gateway: RunningGateway, protocol: str) -> None:
    def metrics() -> str:
        return httpx.get(f"{timing_gateway.url}/metrics", timeout=30).text

    before = metrics()
    for _ in range(3):
        if protocol == "rest":
            rest_infer(timing_gateway.url, "mlp_batched", "input", 1, 64)
        else:
            grpc_infer(timing_gateway.grpc, "mlp_batched", "input", 1, 64, ask=False)
    after = metrics()
    for phase in ("decode", "queue", "batch", "backend", "encode"):
        assert (
            _phase_count(after, "mlp_batched", protocol, phase)
            == _phase_count(before, "mlp_batched", protocol, phase) + 3
        ), phase
    assert _phase_count(after, "mlp_batched", protocol, "load") == _phase_count(
        before, "mlp_batched", protocol, "load"
    )


def stream_infer(
    address: str, model: str, name: str, width: int, count: int, ask: bool
) -> list[tuple[Any, float]]:
    """`count` requests on one tritonclient stream, one at a time: each answer's response, with the
    milliseconds the client waited for it (from sending the request to its callback)."""
    answers: queue.Queue[tuple[Any, Any, float]] = queue.Queue()
    client = triton_grpc.InferenceServerClient(address)
    client.start_stream(
        callback=lambda result, error: answers.put((result, error, time.perf_counter())),
        headers={"x-server-timing": "true"} if ask else None,
    )
    received = []
    try:
        for index in range(count):
            tensor = triton_grpc.InferInput(name, [1, width], "FP32")
            tensor.set_data_from_numpy(np.full((1, width), 0.5, dtype=np.float32))
            sent = time.perf_counter()
            client.async_stream_infer(model, [tensor], request_id=f"timed-{index}")
            result, error, arrived = answers.get(timeout=60)
            assert error is None, error
            received.append((result.get_response(), (arrived - sent) * 1e3))
    finally:
        client.stop_stream()
        client.close()
    return received


STREAM_TIMING = "server_timing"


def test_a_stream_that_asks_has_each_answers_timing(timing_gateway: RunningGateway) -> None:
    for response, waited_ms in stream_infer(timing_gateway.grpc, "affine", "x", 4, 3, ask=True):
        assert response.parameters[STREAM_TIMING].WhichOneof("parameter_choice") == "string_param"
        found = phases(response.parameters[STREAM_TIMING].string_param)
        check_phases(found, {"decode", "queue", "backend", "encode"})
        # The gateway's span of a request lies inside the client's wait for its answer.
        assert found["total"] <= waited_ms, (found, waited_ms)
    batched = stream_infer(timing_gateway.grpc, "mlp_batched", "input", 64, 1, ask=True)
    check_phases(
        phases(batched[0][0].parameters[STREAM_TIMING].string_param),
        {"decode", "queue", "batch", "backend", "encode"},
    )


def test_a_stream_that_does_not_ask_has_no_timing(timing_gateway: RunningGateway) -> None:
    for response, _ in stream_infer(timing_gateway.grpc, "affine", "x", 4, 3, ask=False):
        assert STREAM_TIMING not in response.parameters
        assert response.outputs, response


def test_streamed_requests_are_in_the_phase_histograms(timing_gateway: RunningGateway) -> None:
    def metrics() -> str:
        return httpx.get(f"{timing_gateway.url}/metrics", timeout=30).text

    before = metrics()
    stream_infer(timing_gateway.grpc, "mlp_batched", "input", 64, 3, ask=False)
    after = metrics()
    for phase in ("decode", "queue", "batch", "backend", "encode"):
        assert (
            _phase_count(after, "mlp_batched", "grpc", phase)
            == _phase_count(before, "mlp_batched", "grpc", phase) + 3
        ), phase


@pytest.fixture(scope="module")
def on_demand_gateway(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """Models load at their first request; gRPC answers always carry their timing."""
    running = start_gateway(
        small_repo,
        tmp_path_factory.mktemp("timing") / "gateway.log",
        "--load-mode",
        "on_demand",
        env={"MODELYARD_GRPC_SERVER_TIMING": "true"},
    )
    yield running
    assert running.stop() == 0


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
def test_a_request_that_waited_for_its_load_says_so(on_demand_gateway: RunningGateway, protocol: str) -> None:
    model = "affine" if protocol == "rest" else "identity_fp32"
    name, width = ("x", 4) if protocol == "rest" else ("INPUT", 3)

    def timing() -> dict[str, float]:
        if protocol == "rest":
            return phases(rest_infer(on_demand_gateway.url, model, name, 1, width).headers["Server-Timing"])
        return phases(grpc_infer(on_demand_gateway.grpc, model, name, 1, width, ask=False)["server-timing"])

    first, second = timing(), timing()
    check_phases(first, {"decode", "load", "queue", "backend", "encode"})
    check_phases(second, {"decode", "queue", "backend", "encode"})


def tf_predict(address: str, model: str, name: str, width: int, ask: bool) -> dict[str, str]:
    """One TF Serving Predict through the official stubs; its trailing metadata."""
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.inputs[name].CopyFrom(float_tensor_proto([1, width], [0.5] * width))
    metadata = (("x-server-timing", "true"),) if ask else ()
    with grpc.insecure_channel(address) as channel:
        _, call = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict.with_call(
            request, metadata=metadata, timeout=60
        )
    return dict(call.trailing_metadata() or ())


def test_tf_serving_grpc_sends_timing_only_when_the_call_asks(timing_gateway: RunningGateway) -> None:
    assert "server-timing" not in tf_predict(timing_gateway.grpc, "affine", "x", 4, ask=False)
    asked = tf_predict(timing_gateway.grpc, "affine", "x", 4, ask=True)
    check_phases(phases(asked["server-timing"]), {"decode", "queue", "backend", "encode"})


def test_the_setting_sends_timing_on_every_grpc_answer(on_demand_gateway: RunningGateway) -> None:
    found = tf_predict(on_demand_gateway.grpc, "identity_fp32", "INPUT", 3, ask=False)
    assert "backend;dur=" in found["server-timing"]


def test_the_setting_sends_timing_on_every_streamed_answer(on_demand_gateway: RunningGateway) -> None:
    for response, waited_ms in stream_infer(on_demand_gateway.grpc, "affine", "x", 4, 2, ask=False):
        found = phases(response.parameters[STREAM_TIMING].string_param)
        # The first request may have waited for the load, if no test before it loaded affine.
        check_phases(found, {"decode", "queue", "backend", "encode"} | ({"load"} & set(found)))
        assert found["total"] <= waited_ms, (found, waited_ms)
