"""Keras 3, in-process: a `.keras` file loaded with `keras.saving.load_model` and called directly.

Keras reads its backend (TensorFlow, PyTorch, JAX) from `KERAS_BACKEND` once, when it is first
imported, and cannot switch afterwards; TensorFlow imports Keras as it starts, and the gateway
imports TensorFlow for its TF Serving front door. So one gateway process runs one Keras backend:
`KERAS_BACKEND` in the gateway's environment (Keras' default, `tensorflow`, when unset; where nothing
has imported Keras yet, the first Keras model's `keras.backend` sets it). A model whose
`keras: {backend: ...}` differs from the process's fails to load with a message that says so: serve
it from a second gateway started with that `KERAS_BACKEND`. The model is called as
`model(x, training=False)`, not through `model.predict`, which builds a dataset and a step function
on every call.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import IMPORT_LOCK, LoadSpec, ModelAdapter, override_signature
from gateway.errors import BackendError, GatewayError, InvalidInput, ModelNotReady
from gateway.types import ModelSignature, TensorSpec, datatype_of

PLATFORM = "keras"


class KerasOptions(BaseModel):
    """The `keras:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["tensorflow", "torch", "jax"] = "tensorflow"
    # Requests of one version running at once, each on a thread of the version's own pool.
    workers: int = Field(default=2, ge=1)


def import_keras(adapter: type[ModelAdapter], backend: str, label: str) -> ModuleType:
    """Keras on `backend`, imported on first use; a clear error when this process already runs another."""
    with IMPORT_LOCK:
        if "keras" not in sys.modules and "tensorflow" not in sys.modules:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            os.environ.setdefault("KERAS_BACKEND", backend)
        try:
            keras = importlib.import_module("keras")
            running = str(keras.backend.backend())
        except ImportError as exc:
            raise ModelNotReady(
                f"{label}: Keras on the {backend} backend cannot be imported: {adapter.install_hint()}, "
                f"and {backend} itself ({exc})"
            ) from exc
    if running != backend:
        raise ModelNotReady(
            f"{label}: config.yaml asks for the Keras backend '{backend}', but this process runs Keras on "
            f"'{running}' (Keras fixes its backend when first imported, from KERAS_BACKEND); serve this "
            f"model from a gateway started with KERAS_BACKEND={backend}"
        )
    return keras


def _tensor_spec(name: str, tensor: Any, label: str) -> TensorSpec:
    try:
        datatype = datatype_of(np.dtype(str(tensor.dtype)))
    except (TypeError, ValueError):
        raise ModelNotReady(
            f"{label}: tensor '{name}' has dtype {tensor.dtype}, which modelyard cannot serve"
        ) from None
    return TensorSpec(name, datatype, tuple(-1 if d is None else int(d) for d in tensor.shape))


class KerasAdapter(ModelAdapter):
    backend: ClassVar[str] = "keras"
    artifacts: ClassVar[tuple[str, ...]] = ("model.keras",)
    extra: ClassVar[str | None] = "keras"
    options_model: ClassVar[type[BaseModel]] = KerasOptions
    packages: ClassVar[tuple[str, ...]] = ("keras",)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: KerasOptions = self.read_options(spec)
        self._keras: ModuleType | None = None
        self._model: Any = None
        self._input_names: tuple[str, ...] = ()
        self._output_names: tuple[str, ...] = ()
        self._executor: ThreadPoolExecutor | None = None

    async def load(self) -> None:
        if self.spec.artifact is None:
            raise ModelNotReady(f"{self.spec.label}: no model.keras in {self.spec.version_dir}")
        self._executor = ThreadPoolExecutor(
            max_workers=self._options.workers,
            thread_name_prefix=f"keras-{self.spec.model_name}-{self.spec.version}",
        )
        loop = asyncio.get_running_loop()
        keras, model = await loop.run_in_executor(self._executor, self._load_model)
        label = self.spec.label
        self._input_names = tuple(str(t.name) for t in model.inputs)
        # A model built with a dict of outputs answers a dict keyed by those names; otherwise its
        # outputs go by the names of the layers that make them.
        if isinstance(model.output, Mapping):
            output_tensors = dict(model.output)
        else:
            output_tensors = dict(zip(model.output_names, model.outputs, strict=True))
        self._output_names = tuple(str(n) for n in output_tensors)
        inputs = tuple(
            _tensor_spec(n, t, label) for n, t in zip(self._input_names, model.inputs, strict=True)
        )
        outputs = tuple(_tensor_spec(str(n), t, label) for n, t in output_tensors.items())
        self._signature = ModelSignature(
            inputs=override_signature(inputs, self.spec.config.inputs, label),
            outputs=override_signature(outputs, self.spec.config.outputs, label),
            platform=f"{PLATFORM}_{keras.backend.backend()}",
        )
        self._keras, self._model = keras, model

    def _load_model(self) -> tuple[ModuleType, Any]:
        keras = import_keras(type(self), self._options.backend, self.spec.label)
        artifact = self.spec.artifact
        assert artifact is not None
        try:
            model = keras.saving.load_model(str(artifact), compile=False)
        except Exception as exc:  # a bad .keras file surfaces as zip, JSON and backend errors alike
            raise ModelNotReady(f"{self.spec.label}: Keras cannot load {artifact.name}: {exc}") from exc
        if not getattr(model, "inputs", None) or not getattr(model, "outputs", None):
            raise ModelNotReady(
                f"{self.spec.label}: {artifact.name} holds a model without declared inputs and outputs "
                "(save a functional or built Sequential model)"
            )
        return keras, model

    def _run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        keras, model = self._keras, self._model
        if keras is None or model is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        arguments = [inputs[name] for name in self._input_names]
        result = model(arguments[0] if len(arguments) == 1 else arguments, training=False)
        if isinstance(result, Mapping):
            by_name = dict(result)
        elif isinstance(result, list | tuple):
            by_name = dict(zip(self._output_names, result, strict=True))
        else:
            by_name = {self._output_names[0]: result}
        return {name: np.asarray(keras.ops.convert_to_numpy(by_name[name])) for name in output_names}

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        executor = self._executor
        if executor is None or self._model is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, self._run, inputs, output_names)
        except GatewayError:
            raise
        except (ValueError, TypeError) as exc:  # Keras checks inputs against the model's InputSpec
            raise InvalidInput(f"{self.spec.label}: Keras rejected the input: {exc}") from exc
        except Exception as exc:  # any other failure inside the backend's kernels is the backend's
            raise BackendError(f"{self.spec.label}: Keras failed: {exc}") from exc

    def process_id(self) -> int | None:
        return os.getpid()  # in-process

    async def ready(self) -> bool:
        return self._model is not None

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        self._model = self._keras = None
        if executor is not None:
            executor.shutdown(wait=False)
