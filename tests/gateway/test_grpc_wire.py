"""The gateway's own reading of ModelInferRequest (gateway/protocols/v2_grpc_wire.py): a large
request's raw contents stay views of the received bytes, and it reads every request as protobuf
does, in any field order, and refuses what protobuf refuses."""

from __future__ import annotations

import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2

from gateway.protocols.v2_grpc import decode_infer_request
from gateway.protocols.v2_grpc_wire import LARGE_BYTES, MAX_FIELDS, LargeInferRequest, parse_infer_request
from tests.gateway.test_infer import RNG_SEED, reference
from tests.gateway.test_stream_infer import Stream
from tests.support import RunningGateway, grpc_server, start_gateway


def _pieces(rows: int, inputs: int, seed: int) -> list[bytes]:
    """A request's top-level fields, each serialized alone: their concatenation in any order is
    one valid message (protobuf merges repeated fields in the order they come)."""
    rng = np.random.default_rng(seed)
    pieces = [
        service_pb2.ModelInferRequest(model_name="mlp", model_version="1", id="r-1").SerializeToString(),
        service_pb2.ModelInferRequest(outputs=[{"name": "logits"}]).SerializeToString(),
    ]
    request = service_pb2.ModelInferRequest()
    request.parameters["priority"].int64_param = 3
    request.parameters["note"].string_param = "x" * 200
    pieces.append(request.SerializeToString())
    for index in range(inputs):
        tensor = service_pb2.ModelInferRequest()
        tensor.inputs.add(name=f"in{index}", datatype="FP32", shape=[rows, 64])
        pieces.append(tensor.SerializeToString())
        raw = rng.standard_normal((rows, 64)).astype(np.float32).tobytes()
        pieces.append(service_pb2.ModelInferRequest(raw_input_contents=[raw]).SerializeToString())
    return pieces


def _same(got: Any, data: bytes) -> None:
    """`got` holds what protobuf reads from `data`."""
    expected = service_pb2.ModelInferRequest.FromString(data)
    if isinstance(got, LargeInferRequest):
        assert [bytes(view) for view in got.raw_input_contents] == list(expected.raw_input_contents)
        expected.ClearField("raw_input_contents")
        assert got.message == expected
    else:
        assert got == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.sampled_from([1, 100, 300, 1000]),
    inputs=st.integers(1, 3),
    order=st.randoms(use_true_random=False),
)
def test_a_request_reads_as_protobuf_reads_it_in_any_field_order(
    rows: int, inputs: int, order: random.Random
) -> None:
    pieces = _pieces(rows, inputs, order.randrange(1 << 30))
    order.shuffle(pieces)
    data = b"".join(pieces)
    got = parse_infer_request(data)
    assert isinstance(got, LargeInferRequest) == (len(data) >= LARGE_BYTES)
    _same(got, data)
    # And what the servicer decodes from it is what it decodes from protobuf's own message.
    ours = decode_infer_request(got)
    theirs = decode_infer_request(service_pb2.ModelInferRequest.FromString(data))
    assert [t.name for t in ours.inputs] == [t.name for t in theirs.inputs]
    for mine, its in zip(ours.inputs, theirs.inputs, strict=True):
        np.testing.assert_array_equal(mine.data, its.data)
    assert (ours.id, ours.parameters, ours.model_name) == (theirs.id, theirs.parameters, theirs.model_name)


@settings(max_examples=80, deadline=None)
@given(cut=st.integers(0, 400), junk=st.binary(max_size=12))
def test_a_broken_request_is_refused_where_protobuf_refuses_it(cut: int, junk: bytes) -> None:
    data = b"".join(_pieces(300, 2, 7))
    # Cut near the end or the start, and append whatever: truncated fields, bad tags, bad varints.
    broken = (data[: len(data) - cut] if cut % 2 else data[cut:]) + junk
    try:
        service_pb2.ModelInferRequest.FromString(broken)
    except DecodeError:
        with pytest.raises(DecodeError):
            parse_infer_request(broken)
        return
    _same(parse_infer_request(broken), broken)


def test_a_large_request_of_many_small_fields_is_left_to_protobuf() -> None:
    # A hostile client could pack a MiB with two-byte fields: the walk stops at MAX_FIELDS, and
    # protobuf parses the message as it always did.
    tensor = service_pb2.ModelInferRequest()
    tensor.inputs.add(name="in0", datatype="FP32", shape=[1000, 64])
    raw = np.zeros((1000, 64), np.float32).tobytes()
    unknown = b"\x88\x01\x01" * (MAX_FIELDS + 1)  # field 17, a varint: unknown, kept by protobuf
    data = (
        unknown
        + tensor.SerializeToString()
        + service_pb2.ModelInferRequest(raw_input_contents=[raw]).SerializeToString()
    )
    got = parse_infer_request(data)
    assert not isinstance(got, LargeInferRequest)
    _same(got, data)
    # Under the bound, the same message is walked.
    walked = parse_infer_request(unknown[: 3 * (MAX_FIELDS - 2)] + data[len(unknown) :])
    assert isinstance(walked, LargeInferRequest)


def test_a_large_input_is_a_view_of_the_received_bytes_not_a_copy() -> None:
    data = b"".join(_pieces(1000, 2, 3))
    received = np.frombuffer(data, dtype=np.uint8)
    start = received.ctypes.data
    decoded = decode_infer_request(parse_infer_request(data))
    for tensor in decoded.inputs:
        low, high = np.lib.array_utils.byte_bounds(tensor.data)
        assert start <= low and high <= start + len(data)


def test_large_requests_through_tritonclient_unary_and_streamed(
    gateway: RunningGateway, test_repo: Path
) -> None:
    rng = np.random.default_rng(RNG_SEED)
    batches = [rng.standard_normal((rows, 64)).astype(np.float32) for rows in (1024, 4096)]
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    try:
        for batch in batches:
            tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            (expected,) = reference(test_repo, "mlp", 1, {"input": batch})
            result = client.infer("mlp", [tensor])
            np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-6)
        stream = Stream(client)
        for index, batch in enumerate(batches):
            stream.send("mlp", "input", batch, "FP32", f"large-{index}")
        answers = {str(r.get_response().id): r for r, error in stream.receive(len(batches)) if error is None}
        client.stop_stream()
        for index, batch in enumerate(batches):
            (expected,) = reference(test_repo, "mlp", 1, {"input": batch})
            np.testing.assert_allclose(
                answers[f"large-{index}"].as_numpy("logits"), expected, rtol=1e-5, atol=1e-6
            )
    finally:
        client.close()


def _page_faults(pid: int) -> int:
    """The minor page faults of process `pid` so far (/proc/PID/stat, field 10)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


def _faults_per_large_request(gateway: RunningGateway) -> float:
    """The gateway's page faults per 1 MiB request, four clients at once, after a warm-up."""
    batch = np.random.default_rng(RNG_SEED).standard_normal((4096, 64)).astype(np.float32)
    clients = [triton_grpc.InferenceServerClient(gateway.grpc) for _ in range(4)]
    tensor = triton_grpc.InferInput("input", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch)

    def send(client: Any, count: int) -> None:
        for _ in range(count):
            client.infer("mlp", [tensor])

    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(send, clients, [5] * len(clients)))
            before = _page_faults(gateway.process.pid)
            list(pool.map(send, clients, [20] * len(clients)))
            return (_page_faults(gateway.process.pid) - before) / (20 * len(clients))
    finally:
        for client in clients:
            client.close()


def test_a_gateway_answers_large_requests_without_faulting_their_buffers_in_afresh(
    test_repo: Path, tmp_path: Path
) -> None:
    # glibc's default maps each buffer of a MiB afresh once several are freed together, and
    # faults in its 256 pages as it is written again. The gateway's allocator setting reuses
    # them: two gateways on the same model, with the setting and with glibc's own (0).
    # Both on grpcio, whichever server the run tests: the setting is the subject here. On the
    # native server the request buffers come from its Rust threads' arenas, and glibc's own figure
    # swings too far to bound (31 - 146 faults per request in four runs, 7 - 11 with the setting).
    if grpc_server() == "native":
        pytest.skip("its gateways run on grpcio: the main pass runs this very test")
    repo = tmp_path / "repo"
    shutil.copytree(test_repo / "mlp", repo / "mlp")
    faults = {}
    for threshold in ("8", "0"):
        env = {"MODELYARD_MALLOC_MMAP_THRESHOLD_MB": threshold, "MODELYARD_GRPC_SERVER": "grpcio"}
        running = start_gateway(repo, tmp_path / f"gateway-{threshold}.log", env=env)
        try:
            faults[threshold] = _faults_per_large_request(running)
        finally:
            running.stop()
    print(f"page faults per 1 MiB request: {faults}")
    assert faults["8"] * 4 < faults["0"]
