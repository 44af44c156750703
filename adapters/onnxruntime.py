"""ONNX Runtime, in-process: the embedded default backend.

Sessions run in a thread pool of their own: ONNX Runtime releases the GIL while it computes, so
the event loop keeps serving while a request runs. A request too small to be worth the hand-off
(its input elements times the measured time per element under `onnxruntime.inline_below_us`) runs
on the loop (under 2 ms where the gateway may run on one CPU only, since a second thread cannot
compute beside the loop there). That estimate only holds for a graph whose work follows its input shapes, so a graph
with control flow (Loop, If, Scan) or with a tensor sized by a computed value (ConstantOfShape,
Range, Expand, Tile, Pad, Resize, OneHot, TopK fed by anything but a constant) never runs inline.
As a last guard, inline runs that take ten times the bound turn inlining off for that version: a
few in a row, or one that spent a hundred times the bound on the loop thread's CPU. One slow run
alone is most often a preempted one (by another process, or by the hypervisor, whose steal a
guest counts as the thread's CPU), and must not move a small model off the loop for good.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import LoadSpec, ModelAdapter, override_signature
from gateway.errors import BackendError, InvalidInput, ModelNotReady
from gateway.types import Datatype, ModelSignature, TensorSpec


class OnnxRuntimeOptions(BaseModel):
    """The `onnxruntime:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Threads ONNX Runtime uses inside one operator, and across independent operators.
    intra_op_threads: int = Field(default=1, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)
    # None means: CUDA where onnxruntime-gpu offers it, then CPU.
    providers: tuple[str, ...] | None = None
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    # A request whose expected compute (its input elements x the measured time per element) is below
    # this runs on the event loop: handing a tiny run to the thread pool costs more than the run.
    # 0: always the pool. Unset: INLINE_BELOW_US, or ONE_CPU_INLINE_BELOW_US for a gateway that may
    # run on one CPU only.
    inline_below_us: int | None = Field(default=None, ge=0)


INLINE_BELOW_US = 150
# On one CPU the pool's thread cannot compute while the loop works: it only takes turns with the
# loop, and each hand-off costs two thread switches and a wake-up of the loop. There, every run up
# to this long stays on the loop, which it holds no longer than a scheduler's time slice would.
ONE_CPU_INLINE_BELOW_US = 2000


def inline_bound(options: OnnxRuntimeOptions, cpus: int) -> int:
    """The inline bound in µs: the config's, else the default for a process allowed `cpus` CPUs."""
    if options.inline_below_us is not None:
        return options.inline_below_us
    return ONE_CPU_INLINE_BELOW_US if cpus == 1 else INLINE_BELOW_US


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a cpuset, Kubernetes' static CPU
    manager), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity where the platform has none
        return os.cpu_count() or 1


_DATATYPE_OF_ORT: dict[str, Datatype] = {
    "tensor(bool)": Datatype.BOOL,
    "tensor(uint8)": Datatype.UINT8,
    "tensor(uint16)": Datatype.UINT16,
    "tensor(uint32)": Datatype.UINT32,
    "tensor(uint64)": Datatype.UINT64,
    "tensor(int8)": Datatype.INT8,
    "tensor(int16)": Datatype.INT16,
    "tensor(int32)": Datatype.INT32,
    "tensor(int64)": Datatype.INT64,
    "tensor(float16)": Datatype.FP16,
    "tensor(float)": Datatype.FP32,
    "tensor(double)": Datatype.FP64,
    "tensor(string)": Datatype.BYTES,
}
_GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# ONNX Runtime's own error classes that mean "this input does not fit the graph".
_INPUT_ERRORS = (ort_errors.InvalidArgument,)


# Ops whose output size comes from the values of the inputs named here by position (a slice of
# node.input): fed by anything but a constant, the run's cost no longer follows the input's size.
_SIZED_BY_VALUES: dict[str, slice] = {
    "ConstantOfShape": slice(0, None),
    "Range": slice(0, None),
    "Expand": slice(1, None),
    "Tile": slice(1, None),
    "Pad": slice(1, None),
    "Resize": slice(1, None),
    "Upsample": slice(1, None),
    "OneHot": slice(1, 2),
    "TopK": slice(1, 2),
}
_CONTROL_FLOW = frozenset({"Loop", "If", "Scan"})
# Inline runs in a row that may take over ten times the bound (and under a hundred times on the
# CPU) with inlining kept: slow alone, they are most likely preempted.
PREEMPTED_RUNS_TOLERATED = 2
# A model file this large computes for longer than any inline bound; it is not worth parsing.
_INLINE_SCAN_MAX_BYTES = 64 * 2**20


def cost_follows_input_size(path: Path) -> bool:
    """Whether the graph's work is fixed by its input shapes, so that a per-element estimate holds."""
    if path.stat().st_size > _INLINE_SCAN_MAX_BYTES:
        return False
    try:
        graph = onnx.load_model(str(path), load_external_data=False).graph
    except Exception:  # onnxruntime loaded it; a parse onnx cannot do just means no inlining
        return False
    constants = {tensor.name for tensor in graph.initializer}
    constants |= {out for node in graph.node if node.op_type == "Constant" for out in node.output}
    for node in graph.node:
        if node.op_type in _CONTROL_FLOW:
            return False
        sized_by = _SIZED_BY_VALUES.get(node.op_type)
        if sized_by is not None and any(name and name not in constants for name in node.input[sized_by]):
            return False
    return True


def default_providers() -> list[str]:
    """CUDA first where onnxruntime-gpu provides it, then the CPU."""
    available = ort.get_available_providers()
    preferred = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    return preferred or ["CPUExecutionProvider"]


log = logging.getLogger("modelyard.onnxruntime")


def _elements(inputs: Mapping[str, np.ndarray[Any, Any]]) -> int:
    return max(1, sum(array.size for array in inputs.values()))


def _tensor_spec(node: Any, label: str) -> TensorSpec:
    try:
        datatype = _DATATYPE_OF_ORT[node.type]
    except KeyError:
        raise ModelNotReady(
            f"{label}: tensor '{node.name}' has type {node.type}, which modelyard cannot serve"
        ) from None
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, datatype, shape)


def _to_ort(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # ONNX Runtime takes strings as str objects; the gateway carries BYTES as bytes.
    if array.dtype.kind == "O":
        try:
            return np.array([v.decode("utf-8") for v in array.ravel()], dtype=object).reshape(array.shape)
        except UnicodeDecodeError as exc:
            raise InvalidInput("ONNX Runtime string tensors must hold UTF-8 text") from exc
    return array


def _from_ort(array: Any) -> np.ndarray[Any, Any]:
    result = np.asarray(array)
    if result.dtype.kind in "OU":
        return np.array([str(v).encode("utf-8") for v in result.ravel()], dtype=object).reshape(result.shape)
    return result


class OnnxRuntimeAdapter(ModelAdapter):
    backend: ClassVar[str] = "onnxruntime"
    artifacts: ClassVar[tuple[str, ...]] = ("model.onnx",)
    options_model: ClassVar[type[BaseModel]] = OnnxRuntimeOptions
    aliases: ClassVar[tuple[str, ...]] = ("onnx",)
    packages: ClassVar[tuple[str, ...]] = ("onnxruntime",)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: OnnxRuntimeOptions = self.read_options(spec)
        self._session: ort.InferenceSession | None = None
        self._executor: ThreadPoolExecutor | None = None
        # Measured compute per input element, in µs (an exponential moving average); None until the
        # first run. Inlining is for graphs whose work follows their input size, and stops for good
        # once an inline run has taken far longer than estimated.
        self._element_us: float | None = None
        self._inline = False
        self._inline_below = inline_bound(self._options, usable_cpus())
        # Inline runs in a row that took over ten times the bound on the clock but not on the CPU.
        self._slow_inline_runs = 0

    async def load(self) -> None:
        if self.spec.artifact is None:
            raise ModelNotReady(f"{self.spec.label}: no model.onnx in {self.spec.version_dir}")
        self._executor = ThreadPoolExecutor(
            max_workers=max(2, usable_cpus()),
            thread_name_prefix=f"ort-{self.spec.model_name}-{self.spec.version}",
        )
        loop = asyncio.get_running_loop()
        self._session = await loop.run_in_executor(self._executor, self._create_session)
        self._signature = self._read_signature(self._session)
        if self._inline_below > 0:
            assert self.spec.artifact is not None
            self._inline = await loop.run_in_executor(
                self._executor, cost_follows_input_size, self.spec.artifact
            )

    def _create_session(self) -> ort.InferenceSession:
        options = self._options
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = _GRAPH_OPTIMIZATION[options.graph_optimization]
        providers = list(options.providers) if options.providers else default_providers()
        unknown = [p for p in providers if p not in ort.get_available_providers()]
        if unknown:
            raise ModelNotReady(
                f"{self.spec.label}: execution providers {unknown} are not available; "
                f"this onnxruntime offers {ort.get_available_providers()}"
            )
        artifact = self.spec.artifact
        assert artifact is not None
        try:
            return ort.InferenceSession(str(artifact), session_options, providers=providers)
        except Exception as exc:  # onnxruntime raises several unrelated classes for a bad file
            raise ModelNotReady(f"{self.spec.label}: onnxruntime cannot load {artifact.name}: {exc}") from exc

    def _read_signature(self, session: ort.InferenceSession) -> ModelSignature:
        inputs = tuple(_tensor_spec(node, self.spec.label) for node in session.get_inputs())
        outputs = tuple(_tensor_spec(node, self.spec.label) for node in session.get_outputs())
        return ModelSignature(
            inputs=override_signature(inputs, self.spec.config.inputs, self.spec.label),
            outputs=override_signature(outputs, self.spec.config.outputs, self.spec.label),
            platform="onnxruntime_onnx",
        )

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        session, executor = self._session, self._executor
        if session is None or executor is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        feeds = {name: _to_ort(array) for name, array in inputs.items()}
        names = list(output_names)
        elements = _elements(inputs)
        inline_below = self._inline_below
        try:
            if self._inline and self._element_us is not None and elements * self._element_us < inline_below:
                # The loop thread's CPU clock is read only here, where a slow run is judged by it.
                started_cpu = time.thread_time_ns()
                results, took_us = self._run(session, names, feeds)
                if took_us > 10 * inline_below:
                    self._judge_slow_inline_run(took_us, (time.thread_time_ns() - started_cpu) / 1e3)
                else:
                    self._slow_inline_runs = 0
                    self._fold(took_us, elements)
            else:
                loop = asyncio.get_running_loop()
                results, took_us = await loop.run_in_executor(executor, self._run, session, names, feeds)
                self._fold(took_us, elements)
        except _INPUT_ERRORS as exc:
            raise InvalidInput(f"{self.spec.label}: onnxruntime rejected the input: {exc}") from exc
        except Exception as exc:  # any other failure inside the runtime is the backend's
            raise BackendError(f"{self.spec.label}: onnxruntime failed: {exc}") from exc
        return {name: _from_ort(value) for name, value in zip(names, results, strict=True)}

    def _judge_slow_inline_run(self, took_us: float, cpu_us: float) -> None:
        """An inline run took over ten times the bound. Inlining stops when the run spent a hundred
        times the bound on the loop thread's CPU, or when PREEMPTED_RUNS_TOLERATED such runs came
        right before it. The run is not folded into the estimate: if it was preempted, it says
        nothing of the model."""
        bound = self._inline_below
        self._slow_inline_runs += 1
        if cpu_us <= 100 * bound and self._slow_inline_runs <= PREEMPTED_RUNS_TOLERATED:
            return
        self._inline = False
        log.warning(
            "%s: an inline run took %.0f µs (%.0f µs of CPU) against an estimate under %d µs%s; "
            "its runs go to the thread pool from now on",
            self.spec.label,
            took_us,
            cpu_us,
            bound,
            "" if cpu_us > 100 * bound else f", {self._slow_inline_runs} such runs in a row",
        )

    @staticmethod
    def _run(
        session: ort.InferenceSession, names: list[str], feeds: dict[str, Any]
    ) -> tuple[list[Any], float]:
        """The outputs, and how long the run took in µs."""
        started = time.perf_counter_ns()
        results: list[Any] = session.run(names, feeds)
        return results, (time.perf_counter_ns() - started) / 1e3

    def _fold(self, took_us: float, elements: int) -> None:
        """One run's time into the per-element estimate (an exponential moving average)."""
        per_element = took_us / elements
        self._element_us = (
            per_element if self._element_us is None else 0.9 * self._element_us + 0.1 * per_element
        )

    async def ready(self) -> bool:
        return self._session is not None

    def process_id(self) -> int | None:
        return os.getpid()  # in-process

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        self._session = None
        if executor is not None:
            # Requests already running keep their session alive and finish on their own.
            executor.shutdown(wait=False)
