"""Backend adapters, and `BACKENDS`: the one registry of backends, and the only list of them.

A backend is one module here whose `ModelAdapter` class describes it (name, artifacts, remote or
not, install extra, options model, aliases), plus one `register` line below. config.yaml's backend
names and sections, artifact detection and remote checks (gateway/repository.py), the bench's
aliases and packages, the CLI's help and the install hints all read this registry, at the time
they need it, so a backend registered later (a test's, for one) takes part like the others.

Registering imports no framework: each adapter imports its own when a version loads.
"""

from __future__ import annotations

from adapters.base import LoadSpec, ModelAdapter, SharedResources
from gateway.errors import ModelNotReady

BACKENDS: dict[str, type[ModelAdapter]] = {}


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    """Adds a backend to the registry. Its name, aliases and artifact names must be its own."""
    names = {name: other for other in BACKENDS.values() for name in (other.backend, *other.aliases)}
    for name in (adapter.backend, *adapter.aliases):
        if name in names and names[name] is not adapter:
            raise ValueError(
                f"backend name '{name}' of {adapter.__name__} is taken by {names[name].__name__}"
            )
    artifacts = {artifact: other for other in BACKENDS.values() for artifact in other.artifacts}
    for artifact in adapter.artifacts:
        if artifact in artifacts and artifacts[artifact] is not adapter:
            raise ValueError(
                f"artifact '{artifact}' of {adapter.__name__} is {artifacts[artifact].__name__}'s"
            )
    BACKENDS[adapter.backend] = adapter
    return adapter


def adapter_class(backend: str) -> type[ModelAdapter]:
    if backend not in BACKENDS:
        raise ModelNotReady(f"unknown backend '{backend}'; known: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend]


def create_adapter(backend: str, spec: LoadSpec) -> ModelAdapter:
    return adapter_class(backend)(spec)


def artifact_backends() -> tuple[tuple[str, str], ...]:
    """(artifact name, backend) pairs, in the order that picks a backend when config.yaml names none."""
    return tuple((artifact, name) for name, adapter in BACKENDS.items() for artifact in adapter.artifacts)


def backend_named(name: str) -> str | None:
    """The backend a name or alias stands for (`onnx` is onnxruntime), or None."""
    return next((b for b, adapter in BACKENDS.items() if name in (b, *adapter.aliases)), None)


# The registry lines: detection prefers backends in this order.
from adapters import keras, litert, onnxruntime, tensorflow, tfserving, torchserve, v2  # noqa: E402

register(onnxruntime.OnnxRuntimeAdapter)
register(tensorflow.TensorFlowAdapter)
register(torchserve.TorchServeAdapter)
register(litert.LiteRtAdapter)
register(keras.KerasAdapter)
register(tfserving.TfServingAdapter)
register(v2.V2Adapter)

__all__ = [
    "BACKENDS",
    "LoadSpec",
    "ModelAdapter",
    "SharedResources",
    "adapter_class",
    "artifact_backends",
    "backend_named",
    "create_adapter",
    "register",
]
