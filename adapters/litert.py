"""LiteRT (formerly TensorFlow Lite), in-process: a `.tflite` model on `ai_edge_litert`'s interpreter.

An interpreter is not thread-safe, so each version keeps a small pool of them, one per worker
thread of its own executor: a request takes a free interpreter, runs off the event loop, and gives
it back. The XNNPACK delegate is LiteRT's default CPU delegate; `xnnpack: false` turns it off.
Dynamic batch: an interpreter whose allocated input shapes differ from the request's is resized
(`resize_tensor_input` + `allocate_tensors`) before it runs.
"""

from __future__ import annotations

import asyncio
import os
import queue
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import LoadSpec, ModelAdapter, override_signature
from gateway.errors import BackendError, InvalidInput, ModelNotReady
from gateway.types import ModelSignature, TensorSpec, datatype_of

PLATFORM = "litert_tflite"


class LiteRtOptions(BaseModel):
    """The `litert:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Threads each interpreter (XNNPACK) uses for one request.
    threads: int = Field(default=1, ge=1)
    # Interpreters per version: how many requests run at once.
    pool_size: int = Field(default=2, ge=1)
    xnnpack: bool = True
    # The model's signature whose names are served; default: its only one. None found: tensor names.
    signature: str | None = None


def _tensor_spec(name: str, detail: Mapping[str, Any], label: str) -> TensorSpec:
    try:
        datatype = datatype_of(np.dtype(detail["dtype"]))
    except (TypeError, ValueError):
        raise ModelNotReady(
            f"{label}: tensor '{name}' has dtype {detail['dtype']}, which modelyard cannot serve"
        ) from None
    # shape_signature keeps -1 where the model leaves a dimension open; shape is what is allocated now.
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    return TensorSpec(name, datatype, tuple(int(d) if d >= 0 else -1 for d in dims))


class _Runner:
    """One interpreter, used by one thread at a time. Tensors go by their signature names (`x`, not
    `serving_default_x:0`) where the model has a signature, else by their tensor names."""

    def __init__(self, interpreter: Any, signature: str | None) -> None:
        self.interpreter = interpreter
        if signature is None:
            self.input_details = {str(d["name"]): d for d in interpreter.get_input_details()}
            self.output_details = {str(d["name"]): d for d in interpreter.get_output_details()}
        else:
            runner = interpreter.get_signature_runner(signature)
            self.input_details = dict(runner.get_input_details())
            self.output_details = dict(runner.get_output_details())
        self._indices = {name: int(d["index"]) for name, d in self.input_details.items()}
        self._outputs = {name: int(d["index"]) for name, d in self.output_details.items()}
        self._shapes = {name: tuple(int(n) for n in d["shape"]) for name, d in self.input_details.items()}

    def run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        interpreter = self.interpreter
        resized = False
        for name, array in inputs.items():
            if self._shapes[name] != array.shape:
                interpreter.resize_tensor_input(self._indices[name], list(array.shape), strict=True)
                self._shapes[name] = array.shape
                resized = True
        if resized:
            interpreter.allocate_tensors()
        for name, array in inputs.items():
            interpreter.set_tensor(self._indices[name], np.ascontiguousarray(array))
        interpreter.invoke()
        # get_tensor copies, so the answer outlives the interpreter's next run.
        return {name: interpreter.get_tensor(self._outputs[name]) for name in output_names}


class LiteRtAdapter(ModelAdapter):
    backend: ClassVar[str] = "litert"
    artifacts: ClassVar[tuple[str, ...]] = ("model.tflite",)
    extra: ClassVar[str | None] = "litert"
    options_model: ClassVar[type[BaseModel]] = LiteRtOptions
    aliases: ClassVar[tuple[str, ...]] = ("tflite",)
    packages: ClassVar[tuple[str, ...]] = ("ai-edge-litert",)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: LiteRtOptions = self.read_options(spec)
        self._runners: queue.SimpleQueue[_Runner] | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def load(self) -> None:
        if self.spec.artifact is None:
            raise ModelNotReady(f"{self.spec.label}: no model.tflite in {self.spec.version_dir}")
        size = self._options.pool_size
        self._executor = ThreadPoolExecutor(
            max_workers=size, thread_name_prefix=f"litert-{self.spec.model_name}-{self.spec.version}"
        )
        loop = asyncio.get_running_loop()
        runners = [await loop.run_in_executor(self._executor, self._create_runner) for _ in range(size)]
        first = runners[0]
        inputs = tuple(_tensor_spec(n, d, self.spec.label) for n, d in first.input_details.items())
        outputs = tuple(_tensor_spec(n, d, self.spec.label) for n, d in first.output_details.items())
        self._signature = ModelSignature(
            inputs=override_signature(inputs, self.spec.config.inputs, self.spec.label),
            outputs=override_signature(outputs, self.spec.config.outputs, self.spec.label),
            platform=PLATFORM,
        )
        self._runners = queue.SimpleQueue()
        for runner in runners:
            self._runners.put(runner)

    def _create_runner(self) -> _Runner:
        options, artifact = self._options, self.spec.artifact
        assert artifact is not None
        litert = self.import_framework("ai_edge_litert.interpreter", self.spec.label)
        resolvers = litert.OpResolverType
        resolver = resolvers.AUTO if options.xnnpack else resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            interpreter = litert.Interpreter(
                model_path=str(artifact), num_threads=options.threads, experimental_op_resolver_type=resolver
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelNotReady(f"{self.spec.label}: LiteRT cannot load {artifact.name}: {exc}") from exc
        signatures = sorted(interpreter.get_signature_list())
        signature = options.signature
        if signature is not None and signature not in signatures:
            raise ModelNotReady(
                f"{self.spec.label}: {artifact.name} has no signature '{signature}'; "
                f"it has {', '.join(signatures) or 'none'}"
            )
        if signature is None and len(signatures) > 1:
            raise ModelNotReady(
                f"{self.spec.label}: {artifact.name} has signatures {', '.join(signatures)}; "
                "choose one with litert.signature in config.yaml"
            )
        return _Runner(interpreter, signature or (signatures[0] if signatures else None))

    def _run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        runners = self._runners
        if runners is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        # The executor has as many threads as the pool has interpreters, so one is always free.
        runner = runners.get()
        try:
            return runner.run(inputs, output_names)
        finally:
            runners.put(runner)

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        executor = self._executor
        if executor is None or self._runners is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self._run, inputs, output_names)
        except ValueError as exc:  # set_tensor and resize_tensor_input check dtype and shape
            raise InvalidInput(f"{self.spec.label}: LiteRT rejected the input: {exc}") from exc
        except RuntimeError as exc:  # allocate_tensors or invoke failing inside the runtime
            raise BackendError(f"{self.spec.label}: LiteRT failed: {exc}") from exc

    def process_id(self) -> int | None:
        return os.getpid()  # in-process

    async def ready(self) -> bool:
        return self._runners is not None

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        self._runners = None
        if executor is not None:
            # Requests already running hold their interpreter and finish on their own.
            executor.shutdown(wait=False)
