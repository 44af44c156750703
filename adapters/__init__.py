"""Backend adapters. Each backend kind is one module here plus its entry in `BACKENDS`.

Modules are imported on first use, so a backend whose optional dependencies are missing fails
only for the models that use it, with a message that says what to install.
"""

from __future__ import annotations

import importlib

from adapters.base import LoadSpec, ModelAdapter, SharedResources
from gateway.errors import ModelNotReady

# backend name -> (module, class, the pip extra that brings its dependencies)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "onnxruntime": ("adapters.onnxruntime", "OnnxRuntimeAdapter", None),
    "torchserve": ("adapters.torchserve", "TorchServeAdapter", "torchserve"),
    "tensorflow": ("adapters.tensorflow", "TensorFlowAdapter", "tensorflow"),
    "tfserving": ("adapters.tfserving", "TfServingAdapter", "tensorflow"),
    "litert": ("adapters.litert", "LiteRtAdapter", "litert"),
    "keras": ("adapters.keras", "KerasAdapter", "keras"),
    "v2": ("adapters.v2", "V2Adapter", None),
}

# backend name -> the artifact names in a version folder that select it when config.yaml names no
# backend, in order of preference. Remote backends have none: their version folders may be empty.
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("model.onnx",),
    "tensorflow": ("model.savedmodel", "saved_model.pb"),
    "torchserve": ("model.mar", "model.pt"),
    "litert": ("model.tflite",),
    "keras": ("model.keras",),
    "tfserving": (),
    "v2": (),
}
# Backends that always serve from elsewhere (TorchServe does in its remote mode). A `versions`
# mapping in their config section may list the versions when there are no version folders.
REMOTE_BACKENDS = frozenset({"tfserving", "v2"})


def adapter_class(backend: str) -> type[ModelAdapter]:
    if backend not in BACKENDS:
        raise ModelNotReady(f"unknown backend '{backend}'; known: {', '.join(sorted(BACKENDS))}")
    module_name, class_name, extra = BACKENDS[backend]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = f": install the '{extra}' extra (pip install 'modelyard[{extra}]')" if extra else ""
        raise ModelNotReady(f"backend '{backend}' cannot be imported{hint} ({exc})") from exc
    klass: type[ModelAdapter] = getattr(module, class_name)
    return klass


def create_adapter(backend: str, spec: LoadSpec) -> ModelAdapter:
    return adapter_class(backend)(spec)


__all__ = [
    "ARTIFACTS",
    "BACKENDS",
    "REMOTE_BACKENDS",
    "LoadSpec",
    "ModelAdapter",
    "SharedResources",
    "adapter_class",
    "create_adapter",
]
