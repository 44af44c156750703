"""One request context for all four front doors: v2 over REST and gRPC (tritonclient) and TF
Serving over REST (httpx) and gRPC (the tensorflow-serving-api stubs). Through each, a routing
rule, a priority and a deadline hold, and the metrics tell the doors apart."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from tests.reliability.test_overload import wait_for
from tests.support import RunningGateway

X = np.ones((1, 4), np.float32)
# An n x n product: about 0.6 s at n=3000 on this project's machines, far past a 50 ms deadline;
# the priority test's holder runs about 1.8 s (n=4096), time enough to queue two requests behind it.
# spin's run: about 0.3 ms at SHORT_N, 19 ms at QUEUED_N, 135 ms at LONG_N, 315 ms at HOLD_N. The
# low request's run is long enough that the order in which the gateway served low and high shows in
# the clients' finish times (at 600, 1.7 ms, the two answers came within a millisecond).
LONG_N, HOLD_N, QUEUED_N, SHORT_N = 3000, 4096, 1500, 2
DOORS = ["v2-rest", "v2-grpc", "tfserving-rest", "tfserving-grpc"]
# The `protocol` label of the request metrics for each door.
METRIC_PROTOCOL = {
    "v2-rest": "rest",
    "v2-grpc": "grpc",
    "tfserving-rest": "tfserving_rest",
    "tfserving-grpc": "tfserving_grpc",
}


class Refused(Exception):
    """The door answered with an error: `code` is the HTTP status or the gRPC code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Door:
    name: str
    gateway: RunningGateway

    def infer(self, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str] | None = None) -> Any:
        """The model's only output, through this door, with these headers (gRPC: metadata)."""
        return {
            "v2-rest": self._v2_rest,
            "v2-grpc": self._v2_grpc,
            "tfserving-rest": self._tf_rest,
            "tfserving-grpc": self._tf_grpc,
        }[self.name](model, inputs, dict(headers or {}))

    @staticmethod
    def _v2(
        module: Any, client: Any, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str]
    ) -> Any:
        tensors = []
        for name, value in inputs.items():
            tensor = module.InferInput(
                name, list(value.shape), "INT64" if value.dtype == np.int64 else "FP32"
            )
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        try:
            result = client.infer(model, tensors, headers=headers)
        except InferenceServerException as exc:
            raise Refused(str(exc.status()).removeprefix("StatusCode."), exc.message()) from None
        finally:
            client.close()
        response = result.get_response(as_json=True) if module is triton_grpc else result.get_response()
        return result.as_numpy(response["outputs"][0]["name"])

    def _v2_rest(self, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str]) -> Any:
        return self._v2(
            triton_http, triton_http.InferenceServerClient(self.gateway.http), model, inputs, headers
        )

    def _v2_grpc(self, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str]) -> Any:
        return self._v2(
            triton_grpc, triton_grpc.InferenceServerClient(self.gateway.grpc), model, inputs, headers
        )

    def _tf_rest(self, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str]) -> Any:
        body = {"inputs": {name: value.tolist() for name, value in inputs.items()}}
        answer = httpx.post(
            f"{self.gateway.url}/v1/models/{model}:predict", json=body, headers=headers, timeout=60
        )
        if answer.status_code != 200:
            raise Refused(str(answer.status_code), answer.json()["error"])
        return np.asarray(answer.json()["outputs"])

    def _tf_grpc(self, model: str, inputs: dict[str, np.ndarray], headers: dict[str, str]) -> Any:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        with grpc.insecure_channel(self.gateway.grpc) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            try:
                response = stub.Predict(request, timeout=60, metadata=list(headers.items()))
            except grpc.RpcError as exc:
                raise Refused(exc.code().name, exc.details()) from None
        (proto,) = response.outputs.values()
        return tf.make_ndarray(proto)


@pytest.fixture(params=DOORS)
def door(request: pytest.FixtureRequest, gateway: RunningGateway) -> Iterator[Door]:
    yield Door(request.param, gateway)


def affine(test_repo: Path, version: int) -> np.ndarray:
    session = ort.InferenceSession(str(test_repo / "routed" / str(version) / "model.onnx"))
    return np.asarray(session.run(None, {"x": X})[0])


@pytest.mark.parametrize(
    ("headers", "version"),
    [({"x-canary": "yes"}, 2), ({"x-beta-tester": "1"}, 1), ({"x-model-label": "canary"}, 2)],
    ids=["canary-to-version", "canary-to-label", "label-header"],
)
def test_a_routing_rule_holds(door: Door, test_repo: Path, headers: dict[str, str], version: int) -> None:
    """`routed` splits 50/50 between two versions with other weights; a rule's header picks one."""
    want = affine(test_repo, version)
    for _ in range(6):
        np.testing.assert_allclose(door.infer("routed", {"x": X}, headers), want, rtol=1e-6, atol=1e-6)


def test_a_deadline_holds(door: Door) -> None:
    started = time.monotonic()
    with pytest.raises(Refused) as refused:
        door.infer("spin", {"n": np.array([LONG_N], np.int64)}, {"x-timeout-ms": "50"})
    assert refused.value.code in ("504", "DEADLINE_EXCEEDED")
    assert time.monotonic() - started < 0.5


def _priority_race(door: Door, gateway: RunningGateway) -> dict[str, float] | None:
    """The holder takes spin_queued's one slot; a low-priority request queues, then a high one.
    The finish times of all three, or None where the holder finished before both were queued (a
    busy machine): the slot then went to whoever was queued, and priority had nothing to decide."""
    finished: dict[str, float] = {}
    failures: list[BaseException] = []

    def send(key: str, n: int, priority: str, via: Callable[..., Any]) -> None:
        try:
            via("spin_queued", {"n": np.array([n], np.int64)}, {"x-priority": priority})
        except BaseException as exc:
            failures.append(exc)
        finished[key] = time.monotonic()

    holder_door = Door("v2-rest", gateway)
    holder = threading.Thread(target=send, args=("holder", HOLD_N, "normal", holder_door.infer))
    holder.start()
    wait_for(gateway, "modelyard_inflight_requests", "spin_queued", lambda value: value == 1)
    low = threading.Thread(target=send, args=("low", QUEUED_N, "low", door.infer))
    low.start()
    wait_for(gateway, "modelyard_queued_requests", "spin_queued", lambda value: value == 1)
    high = threading.Thread(target=send, args=("high", SHORT_N, "high", door.infer))
    high.start()
    # Both queued while the holder runs: from here the order is the gateway's to choose.
    wait_for(
        gateway,
        "modelyard_queued_requests",
        "spin_queued",
        lambda value: value == 2 or "holder" in finished,
    )
    both_queued = "holder" not in finished
    for thread in (holder, low, high):
        thread.join(60)
    assert not failures, failures
    return finished if both_queued else None


def test_a_priority_holds(door: Door, gateway: RunningGateway) -> None:
    """spin_queued runs one request and queues four. With its slot held, a low-priority request
    queues first and a high-priority one after it: the high one is served first."""
    for _ in range(3):  # bounded: only a holder that finished too soon makes it try again
        finished = _priority_race(door, gateway)
        if finished is not None:
            break
    else:
        raise AssertionError("the holding request finished before the other two were queued, three times")
    assert finished["high"] < finished["low"]
    with pytest.raises(Refused) as refused:
        door.infer("spin_queued", {"n": np.array([SHORT_N], np.int64)}, {"x-priority": "urgent"})
    assert refused.value.code in ("400", "INVALID_ARGUMENT")
    assert "high, normal or low" in str(refused.value)


def test_the_metrics_tell_the_doors_apart(door: Door, gateway: RunningGateway) -> None:
    door.infer("routed", {"x": X}, {"x-canary": "yes"})
    text = httpx.get(f"{gateway.url}/metrics").text
    labels = f'model="routed",protocol="{METRIC_PROTOCOL[door.name]}",version="2"'
    code = "OK" if door.name.endswith("grpc") else "200"
    pattern = rf'^modelyard_requests_total\{{backend="onnxruntime",code="{code}",{labels}\}} (\S+)$'
    assert any(re.match(pattern, line) for line in text.splitlines()), pattern


def test_tf_serving_rest_decodes_against_the_version_it_runs(gateway: RunningGateway) -> None:
    """split_dtypes sends half its traffic to an FP32 identity and half to an INT64 one: each
    request is decoded against the version it runs on, so every one of them is answered."""
    answers = []
    for _ in range(24):
        reply = httpx.post(
            f"{gateway.url}/v1/models/split_dtypes:predict",
            json={"inputs": {"INPUT": [[1, 2, 3]]}},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        answers.append(reply.json()["outputs"])
    assert all(answer == [[1, 2, 3]] for answer in answers)
