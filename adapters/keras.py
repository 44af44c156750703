"""Keras 3, in-process: a `.keras` file loaded with `keras.saving.load_model` and called directly.

Keras reads its backend (TensorFlow, PyTorch, JAX) from `KERAS_BACKEND` once, when it is first
imported, and cannot switch afterwards. So one gateway process runs one Keras backend:
`KERAS_BACKEND` in the gateway's environment (where it is unset and nothing has imported Keras or
TensorFlow yet, the first Keras model's `keras.backend` sets it; TensorFlow is imported only when a
TensorFlow-family model loads or a TF Serving gRPC call arrives). A model whose
`keras: {backend: ...}` differs from the process's fails to load with a message that says so: serve
it from a second gateway started with that `KERAS_BACKEND`. The model is called as
`model(x, training=False)`, not through `model.predict`, which builds a dataset and a step function
on every call.

Every kind of model Keras 3 saves serves: functional, Sequential (built with an `Input` or by being
called) and subclassed. A subclassed model's classes must be registered
(`keras.saving.register_keras_serializable`) by a module the gateway imports first:
`keras: {custom_objects_module: my_package.layers}`. Its tensors are read as Keras' own export
reads them, with the batch dimension open: a functional or Sequential model's inputs and outputs,
a subclassed model's shapes from its first call and the output Keras computes from them.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
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
from gateway.native_logs import quiet_import
from gateway.types import ModelSignature, TensorSpec, datatype_of

PLATFORM = "keras"


class KerasOptions(BaseModel):
    """The `keras:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["tensorflow", "torch", "jax"] = "tensorflow"
    # Requests of one version running at once, each on a thread of the version's own pool.
    workers: int = Field(default=2, ge=1)
    # A module on the gateway's Python path that registers the model's own classes (a subclassed
    # model, custom layers) with `keras.saving.register_keras_serializable`; imported before the
    # model loads, into the gateway's process.
    custom_objects_module: str | None = None


def import_keras(adapter: type[ModelAdapter], backend: str, label: str) -> ModuleType:
    """Keras on `backend`, imported on first use; a clear error when this process already runs another."""
    with IMPORT_LOCK:
        if "keras" not in sys.modules and "tensorflow" not in sys.modules:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            os.environ.setdefault("KERAS_BACKEND", backend)
        try:
            keras = quiet_import("keras")
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
    # The batch dimension is open, as Keras' export makes it: a model built by a call on 5 rows
    # takes any number.
    dims = tuple(-1 if d is None else int(d) for d in tensor.shape)
    return TensorSpec(name, datatype, (-1, *dims[1:]) if dims else ())


def _is_shape(value: Any) -> bool:
    return isinstance(value, list | tuple) and all(d is None or isinstance(d, int) for d in value)


def _symbolic_inputs(keras: ModuleType, model: Any, label: str) -> tuple[dict[str, Any], bool]:
    """The model's inputs by name as symbolic tensors, and whether they are passed one argument
    each (a subclassed model's `call` arguments) rather than as one list."""
    if isinstance(getattr(model, "inputs", None), list) and model.inputs:
        return {str(t.name): t for t in model.inputs}, False
    build = model.get_build_config() or {}
    if "input_shape" in build:
        # One `call` argument: Keras records its shape under this key, the argument's name aside.
        shapes = {next(iter(inspect.signature(model.call).parameters)): build["input_shape"]}
    else:
        shapes = {key.removesuffix("_shape"): value for key, value in build.items() if key.endswith("_shape")}
    if not shapes or not all(_is_shape(shape) for shape in shapes.values()):
        raise ModelNotReady(
            f"{label}: {type(model).__name__} was saved before its first call, or takes nested inputs, "
            "so its input shapes are unknown: call it once on an example batch before saving"
        )
    dtype = model.input_dtype
    return {name: keras.KerasTensor((None, *shape[1:]), dtype) for name, shape in shapes.items()}, True


def _symbolic_outputs(model: Any, inputs: dict[str, Any], positional: bool, label: str) -> dict[str, Any]:
    """The model's outputs by name: a functional model's by the layers that make them (or its
    output dict's keys), a Sequential's by its last layer, a subclassed one's as Keras computes them
    (`output_0`... unless it answers a dict)."""
    if not positional:
        if not hasattr(model, "output_names"):  # Sequential: one output, from its last layer
            (output,) = model.outputs
            return {str(model.layers[-1].name): output}
        if isinstance(model.output, Mapping):
            return dict(model.output)
        return dict(zip(model.output_names, model.outputs, strict=True))
    try:
        spec = model.compute_output_spec(*inputs.values())
    except Exception as exc:  # whatever the model's own `call` raises on symbolic tensors
        raise ModelNotReady(
            f"{label}: Keras cannot work out the outputs of {type(model).__name__}: {exc}"
        ) from exc
    if isinstance(spec, Mapping):
        return {str(name): tensor for name, tensor in spec.items()}
    outputs = list(spec) if isinstance(spec, list | tuple) else [spec]
    return {f"output_{index}": tensor for index, tensor in enumerate(outputs)}


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
        # A subclassed model takes its inputs one `call` argument each, others as one list.
        self._positional = False
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
        inputs, self._positional = _symbolic_inputs(keras, model, label)
        outputs = await loop.run_in_executor(
            self._executor, _symbolic_outputs, model, inputs, self._positional, label
        )
        self._input_names, self._output_names = tuple(inputs), tuple(outputs)
        self._signature = ModelSignature(
            inputs=override_signature(
                tuple(_tensor_spec(n, t, label) for n, t in inputs.items()), self.spec.config.inputs, label
            ),
            outputs=override_signature(
                tuple(_tensor_spec(n, t, label) for n, t in outputs.items()), self.spec.config.outputs, label
            ),
            platform=f"{PLATFORM}_{keras.backend.backend()}",
        )
        self._keras, self._model = keras, model

    def _load_model(self) -> tuple[ModuleType, Any]:
        keras = import_keras(type(self), self._options.backend, self.spec.label)
        artifact, custom = self.spec.artifact, self._options.custom_objects_module
        assert artifact is not None
        if custom is not None:
            try:
                with IMPORT_LOCK:
                    importlib.import_module(custom)
            except Exception as exc:  # the user's module: any error in it, or none on the path
                raise ModelNotReady(
                    f"{self.spec.label}: cannot import keras.custom_objects_module '{custom}': {exc}"
                ) from exc
        try:
            model = keras.saving.load_model(str(artifact), compile=False)
        except Exception as exc:  # a bad .keras file surfaces as zip, JSON and backend errors alike
            hint = ""
            if custom is None and "Could not locate" in str(exc):
                hint = (
                    "; name the module that registers the model's classes in "
                    "keras.custom_objects_module in config.yaml"
                )
            raise ModelNotReady(f"{self.spec.label}: Keras cannot load {artifact.name}: {exc}{hint}") from exc
        return keras, model

    def _run(
        self, inputs: Mapping[str, np.ndarray[Any, Any]], output_names: Sequence[str]
    ) -> dict[str, np.ndarray[Any, Any]]:
        keras, model = self._keras, self._model
        if keras is None or model is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        arguments = [inputs[name] for name in self._input_names]
        if self._positional:
            result = model(*arguments, training=False)
        else:
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
