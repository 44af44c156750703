"""Dynamic batching around the real ONNX Runtime adapter: merged, split back in order, bounded, and a
bad request fails alone."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

from adapters.base import LoadSpec
from adapters.onnxruntime import OnnxRuntimeAdapter
from gateway.batching import BatchingAdapter
from gateway.config import Batching, ModelConfig
from gateway.errors import BackendError, DeadlineExceeded
from gateway.types import Datatype
from scripts.build_models import _save, build_mlp
from tests.support import RunningGateway
from tests.support.model_builders import build_gather, build_identity

RNG = np.random.default_rng(11)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, rows: int, waited_s: float) -> None:
        self.batches.append(rows)


async def wrapped(path: Path, options: Batching, recorder: Recorder) -> BatchingAdapter:
    spec = LoadSpec(path.parent.parent.name, 1, path.parent, path, ModelConfig())
    adapter = BatchingAdapter(OnnxRuntimeAdapter(spec), options, recorder)
    await adapter.load()
    return adapter


@pytest.fixture
async def mlp(tmp_path: Path) -> AsyncIterator[tuple[BatchingAdapter, OnnxRuntimeAdapter, Recorder]]:
    path = tmp_path / "mlp" / "1" / "model.onnx"
    _save(build_mlp(), path)
    recorder = Recorder()
    adapter = await wrapped(path, Batching(max_batch_size=8, max_queue_delay_us=200_000), recorder)
    reference = OnnxRuntimeAdapter(adapter.spec)
    await reference.load()
    yield adapter, reference, recorder
    await adapter.aclose()
    await reference.aclose()


async def test_concurrent_requests_merge_and_split_in_order(mlp: Any) -> None:
    adapter, reference, recorder = mlp
    inputs = [RNG.standard_normal((rows, 64)).astype(np.float32) for rows in (1, 2, 1, 3, 1)]
    results = await asyncio.gather(*(adapter.infer({"input": x}, ["logits"]) for x in inputs))
    for x, result in zip(inputs, results, strict=True):
        expected = await reference.infer({"input": x}, ["logits"])
        np.testing.assert_allclose(result["logits"], expected["logits"], rtol=1e-6)
    assert recorder.batches == [8]


async def test_batches_never_exceed_max_batch_size(mlp: Any) -> None:
    adapter, reference, recorder = mlp
    inputs = [RNG.standard_normal((3, 64)).astype(np.float32) for _ in range(7)]
    results = await asyncio.gather(*(adapter.infer({"input": x}, ["logits"]) for x in inputs))
    assert all(rows <= 8 for rows in recorder.batches)
    assert sum(recorder.batches) == 21
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_allclose(
            result["logits"], (await reference.infer({"input": x}, ["logits"]))["logits"], rtol=1e-6
        )


async def test_a_request_of_max_batch_size_runs_at_once(mlp: Any) -> None:
    adapter, _, recorder = mlp
    result = await adapter.infer({"input": np.ones((8, 64), np.float32)}, ["logits"])
    assert result["logits"].shape == (8, 10)
    assert recorder.batches == []


async def test_a_preferred_size_dispatches_without_waiting_out_the_delay(tmp_path: Path) -> None:
    path = tmp_path / "mlp" / "1" / "model.onnx"
    _save(build_mlp(), path)
    recorder = Recorder()
    # A 60 s delay: only the preferred size can send this batch before the test's own timeout.
    adapter = await wrapped(
        path, Batching(max_batch_size=16, max_queue_delay_us=60_000_000, preferred_batch_sizes=(4,)), recorder
    )
    try:
        calls = [adapter.infer({"input": np.ones((1, 64), np.float32)}, ["logits"]) for _ in range(4)]
        await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
    finally:
        await adapter.aclose()
    assert recorder.batches == [4]


async def test_requests_of_other_shapes_are_grouped_apart(tmp_path: Path) -> None:
    path = tmp_path / "identity" / "1" / "model.onnx"
    _save(build_identity(Datatype.FP32), path)
    recorder = Recorder()
    adapter = await wrapped(path, Batching(max_batch_size=16, max_queue_delay_us=100_000), recorder)
    try:
        inputs = [
            np.full((2, 3), 1, np.float32),
            np.full((1, 5), 2, np.float32),
            np.full((3, 3), 3, np.float32),
        ]
        results = await asyncio.gather(*(adapter.infer({"INPUT": x}, ["OUTPUT"]) for x in inputs))
    finally:
        await adapter.aclose()
    for x, result in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(result["OUTPUT"], x)
    assert sorted(recorder.batches) == [1, 5]


async def test_a_bad_request_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "gather" / "1" / "model.onnx"
    _save(build_gather(), path)
    recorder = Recorder()
    adapter = await wrapped(path, Batching(max_batch_size=16, max_queue_delay_us=100_000), recorder)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    try:
        good, bad = await asyncio.gather(
            adapter.infer({"x": x, "idx": np.array([[1], [3]])}, ["y"]),
            adapter.infer({"x": x[:1], "idx": np.array([[9]])}, ["y"]),
            return_exceptions=True,
        )
    finally:
        await adapter.aclose()
    assert isinstance(good, dict)
    np.testing.assert_array_equal(good["y"], [[1.0], [7.0]])
    assert isinstance(bad, BackendError)
    assert recorder.batches == [3]


def test_batched_model_through_the_gateway(gateway: RunningGateway, test_repo: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(test_repo / "mlp_batched" / "1" / "model.onnx"))
    inputs = [RNG.standard_normal((1 + i % 2, 64)).astype(np.float32) for i in range(32)]

    def call(x: np.ndarray) -> np.ndarray:
        client = triton_http.InferenceServerClient(gateway.http)
        tensor = triton_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("mlp_batched", [tensor]).as_numpy("logits")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, session.run(None, {"input": x})[0], rtol=1e-5, atol=1e-6)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(httpx.get(f"{gateway.url}/metrics").text)
        for s in family.samples
        if s.labels.get("model") == "mlp_batched"
    }
    assert samples["modelyard_batch_size_sum"] == sum(x.shape[0] for x in inputs)
    assert samples["modelyard_batch_size_count"] >= 1
    assert samples["modelyard_batch_queue_duration_seconds_count"] == samples["modelyard_batch_size_count"]


async def test_a_request_whose_deadline_passes_in_the_batch_queue_never_reaches_the_backend(mlp: Any) -> None:
    """The batch leaves after 200 ms; a request due in 50 ms is dropped from it, the other runs."""
    adapter, reference, recorder = mlp
    x = RNG.standard_normal((1, 64)).astype(np.float32)
    due = time.monotonic() + 0.05
    expired, served = await asyncio.gather(
        adapter.infer({"input": x}, ["logits"], deadline=due),
        adapter.infer({"input": x}, ["logits"]),
        return_exceptions=True,
    )
    assert isinstance(expired, DeadlineExceeded) and expired.stage == "batch_queue"
    assert isinstance(served, dict)
    np.testing.assert_allclose(served["logits"], (await reference.infer({"input": x}, ["logits"]))["logits"])
    assert recorder.batches == [1]
