"""The ONNX Runtime adapter on its own: loading, metadata, inference, and errors at its boundary."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from adapters import adapter_class
from adapters.base import LoadSpec
from adapters.onnxruntime import (
    INLINE_BELOW_US,
    ONE_CPU_INLINE_BELOW_US,
    PREEMPTED_RUNS_TOLERATED,
    OnnxRuntimeAdapter,
    OnnxRuntimeOptions,
    cost_follows_input_size,
    default_providers,
    inline_bound,
)
from gateway.config import ModelConfig
from gateway.errors import BackendError, InvalidInput, ModelNotReady
from gateway.types import Datatype, TensorSpec
from scripts.build_models import _save, build_affine, build_text_normalizer
from tests.support.model_builders import build_reshape, build_spin


def spec_for(path: Path, config: ModelConfig | None = None, name: str = "m") -> LoadSpec:
    return LoadSpec(name, 1, path.parent, path, config or ModelConfig())


@pytest.fixture
def affine_path(tmp_path: Path) -> Path:
    path = tmp_path / "m" / "1" / "model.onnx"
    _save(build_affine(1), path)
    return path


async def test_load_describe_infer(affine_path: Path) -> None:
    async with OnnxRuntimeAdapter(spec_for(affine_path)) as adapter:
        assert await adapter.ready()
        signature = await adapter.metadata()
        assert signature.inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        assert signature.outputs == (TensorSpec("y", Datatype.FP32, (-1, 3)),)
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        result = await adapter.infer({"x": x}, ["y"])
    expected = ort.InferenceSession(str(affine_path)).run(None, {"x": x})[0]
    np.testing.assert_allclose(result["y"], expected)
    assert not await adapter.ready()


async def test_strings_cross_as_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t" / "1" / "model.onnx"
    _save(build_text_normalizer(), path)
    async with OnnxRuntimeAdapter(spec_for(path)) as adapter:
        result = await adapter.infer({"text": np.array([b"ABC", b"the"], dtype=object)}, ["normalized"])
        assert list(result["normalized"]) == [b"abc"]
        with pytest.raises(InvalidInput, match="UTF-8"):
            await adapter.infer({"text": np.array([b"\xff\xfe"], dtype=object)}, ["normalized"])


async def test_unreadable_artifact_is_not_ready(tmp_path: Path) -> None:
    path = tmp_path / "m" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    with pytest.raises(ModelNotReady, match=r"model 'm' version 1: onnxruntime cannot load model\.onnx"):
        await OnnxRuntimeAdapter(spec_for(path)).load()


async def test_unavailable_provider_is_a_clear_error(affine_path: Path) -> None:
    config = ModelConfig.model_validate({"onnxruntime": {"providers": ["TensorrtExecutionProvider"]}})
    adapter = OnnxRuntimeAdapter(spec_for(affine_path, config))
    with pytest.raises(ModelNotReady, match="TensorrtExecutionProvider"):
        await adapter.load()
    await adapter.aclose()


def test_default_providers_prefer_cuda_where_present() -> None:
    providers = default_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == (
        "CUDAExecutionProvider" in ort.get_available_providers()
    )


async def test_config_fills_in_shapes_and_must_agree_on_names(affine_path: Path) -> None:
    narrowed = ModelConfig.model_validate({"inputs": [{"name": "x", "datatype": "FP32", "shape": [8, 4]}]})
    async with OnnxRuntimeAdapter(spec_for(affine_path, narrowed)) as adapter:
        assert (await adapter.metadata()).inputs == (TensorSpec("x", Datatype.FP32, (8, 4)),)
    for wrong, message in (
        ({"name": "z", "datatype": "FP32", "shape": [-1, 4]}, "declares tensor 'z'"),
        ({"name": "x", "datatype": "INT32", "shape": [-1, 4]}, "config.yaml says 'x' is INT32"),
    ):
        adapter = OnnxRuntimeAdapter(spec_for(affine_path, ModelConfig.model_validate({"inputs": [wrong]})))
        with pytest.raises(ModelNotReady, match=message):
            await adapter.load()
        await adapter.aclose()


async def test_runtime_failures_become_gateway_errors(affine_path: Path, tmp_path: Path) -> None:
    async with OnnxRuntimeAdapter(spec_for(affine_path)) as adapter:
        with pytest.raises(InvalidInput, match="onnxruntime rejected the input"):
            await adapter.infer({"x": np.ones((1, 4), dtype=np.float64)}, ["y"])
    path = tmp_path / "r" / "1" / "model.onnx"
    _save(build_reshape(), path)
    async with OnnxRuntimeAdapter(spec_for(path)) as adapter:
        with pytest.raises(BackendError, match="onnxruntime failed") as caught:
            await adapter.infer({"x": np.ones(6, np.float32), "shape": np.array([4, 4])}, ["y"])
        assert caught.value.__cause__ is not None


async def test_infer_after_close_is_not_ready(affine_path: Path) -> None:
    adapter = OnnxRuntimeAdapter(spec_for(affine_path))
    await adapter.load()
    await adapter.aclose()
    await adapter.aclose()
    with pytest.raises(ModelNotReady):
        await adapter.infer({"x": np.ones((1, 4), np.float32)}, ["y"])


def test_unknown_backend_says_which_exist() -> None:
    with pytest.raises(
        ModelNotReady,
        match="unknown backend 'caffe'; known: keras, litert, onnxruntime, tensorflow, tfserving, torchserve, v2",
    ):
        adapter_class("caffe")


@pytest.mark.parametrize(("inline_below_us", "inline"), [(10**6, True), (0, False)])
async def test_tiny_requests_run_on_the_event_loop(
    affine_path: Path, inline_below_us: int, inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ModelConfig.model_validate({"onnxruntime": {"inline_below_us": inline_below_us}})
    x = np.ones((1, 4), dtype=np.float32)
    threads: list[threading.Thread] = []
    async with OnnxRuntimeAdapter(spec_for(affine_path, config)) as adapter:
        run = adapter._run

        def recording_run(*args: Any) -> Any:
            threads.append(threading.current_thread())
            return run(*args)

        monkeypatch.setattr(adapter, "_run", recording_run)
        first = await adapter.infer({"x": x}, ["y"])  # not yet measured: the pool runs it, timed
        results = await asyncio.gather(*(adapter.infer({"x": x}, ["y"]) for _ in range(5)))
    for result in results:
        np.testing.assert_array_equal(result["y"], first["y"])
    assert threads[0] is not threading.main_thread()
    assert all((t is threading.main_thread()) is inline for t in threads[1:])


def test_graphs_sized_by_values_are_never_inlined(affine_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "spin.onnx"
    _save(build_spin(), path)  # ConstantOfShape sized by the value of n
    assert cost_follows_input_size(affine_path)
    assert not cost_follows_input_size(path)
    looped = tmp_path / "loop.onnx"
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", ""], [], body=body), helper.make_node("Identity", ["x"], ["y"])],
        "looped",
        [
            helper.make_tensor_value_info("n", TensorProto.INT64, []),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), str(looped))
    assert not cost_follows_input_size(looped)


async def test_inlining_stops_when_a_run_outgrows_its_estimate(tmp_path: Path) -> None:
    # The spin model's compute follows the value of n (an n x n product), not the input's size.
    # The graph scan keeps it off the loop; here inlining is forced on, as for a graph whose
    # value-driven cost the scan missed, and one inline run that computes for over a hundred times
    # the bound (n = 3072: about half a second here, against 2 ms) turns it off at once.
    path = tmp_path / "m" / "1" / "model.onnx"
    _save(build_spin(), path)
    config = ModelConfig.model_validate({"onnxruntime": {"inline_below_us": 2_000}})
    threads: list[threading.Thread] = []
    async with OnnxRuntimeAdapter(spec_for(path, config)) as adapter:
        assert not adapter._inline
        adapter._inline = True
        run = adapter._run

        def recording_run(*args: Any) -> Any:
            threads.append(threading.current_thread())
            return run(*args)

        adapter._run = recording_run  # type: ignore[method-assign]
        small, large = np.array([2], dtype=np.int64), np.array([3072], dtype=np.int64)
        for n in (small, small, large, small):
            result = await adapter.infer({"n": n}, ["sum"])
            assert result["sum"][0] == float(n[0]) ** 3
    on_loop = [t is threading.main_thread() for t in threads]
    assert on_loop == [False, True, True, False]


class Preempted:
    """The real session, whose chosen runs lose the CPU for a while first: long on the clock,
    short on the loop thread's CPU, as when the OS runs another process mid-run."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session = session
        self.pauses: list[float] = []
        self.threads: list[threading.Thread] = []

    def run(self, names: Any, feeds: Any) -> Any:
        self.threads.append(threading.current_thread())
        if self.pauses:
            time.sleep(self.pauses.pop(0))
        return self._session.run(names, feeds)


async def test_a_preempted_inline_run_does_not_move_a_small_model_off_the_loop(affine_path: Path) -> None:
    config = ModelConfig.model_validate({"onnxruntime": {"inline_below_us": 200}})
    x = np.ones((1, 4), dtype=np.float32)
    async with OnnxRuntimeAdapter(spec_for(affine_path, config)) as adapter:
        await adapter.infer({"x": x}, ["y"])  # measured in the pool
        assert adapter._session is not None and adapter._inline
        # A cold first run (the test alone in its process) can put the estimate over the bound, and
        # every run in the pool; this test is about how slow inline runs are judged.
        assert adapter._element_us is not None
        adapter._element_us = min(adapter._element_us, 1.0)
        estimate = adapter._element_us
        preempted = Preempted(adapter._session)
        adapter._session = preempted  # type: ignore[assignment]
        # One run preempted for 20 ms (100x the bound), then a normal one: both on the loop.
        preempted.pauses = [0.02]
        for _ in range(2):
            await adapter.infer({"x": x}, ["y"])
        # As many slow runs in a row as are tolerated: still on the loop; one more and it stops.
        preempted.pauses = [0.02] * (PREEMPTED_RUNS_TOLERATED + 1)
        for _ in range(PREEMPTED_RUNS_TOLERATED + 2):
            await adapter.infer({"x": x}, ["y"])
    on_loop = [t is threading.main_thread() for t in preempted.threads]
    assert on_loop == [True] * (PREEMPTED_RUNS_TOLERATED + 3) + [False]
    # The pauses said nothing of the model: the estimate never took them in.
    assert estimate is not None and adapter._element_us is not None
    assert adapter._element_us < 10 * estimate


def test_the_inline_bound_is_the_configs_else_longer_on_one_cpu() -> None:
    def bound(value: int | None, cpus: int) -> int:
        return inline_bound(OnnxRuntimeOptions(inline_below_us=value), cpus)

    assert bound(None, 2) == INLINE_BELOW_US
    assert bound(None, 1) == ONE_CPU_INLINE_BELOW_US
    assert bound(0, 1) == 0  # the config's word holds: never inline
    assert bound(300, 1) == bound(300, 8) == 300


@pytest.mark.parametrize("one_cpu", [True, False])
async def test_on_one_cpu_a_run_expected_to_take_a_millisecond_stays_on_the_loop(
    affine_path: Path, one_cpu: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's CPU affinity, not the machine's CPU count, decides: set here on the test's own
    thread, which the adapter reads and its pool's threads inherit, then put back."""
    allowed = os.sched_getaffinity(0)
    if not one_cpu and len(allowed) < 2:
        pytest.skip("this machine gives the process one CPU")
    threads: list[threading.Thread] = []
    x = np.ones((1, 4), dtype=np.float32)
    try:
        if one_cpu:
            os.sched_setaffinity(0, {min(allowed)})
        adapter = OnnxRuntimeAdapter(spec_for(affine_path))
    finally:
        os.sched_setaffinity(0, allowed)
    async with adapter:
        run = adapter._run

        def recording_run(*args: Any) -> Any:
            threads.append(threading.current_thread())
            return run(*args)

        monkeypatch.setattr(adapter, "_run", recording_run)
        await adapter.infer({"x": x}, ["y"])  # measured from here
        adapter._element_us = 1000 / x.size  # as if each such run took 1 ms
        await adapter.infer({"x": x}, ["y"])
    assert (threads[-1] is threading.main_thread()) is one_cpu
