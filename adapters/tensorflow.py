"""TensorFlow, in-process: a SavedModel's signature served from a session of its own.

Each version gets a `tf.compat.v1.Session` with its own intra/inter-op thread pools, as TF Serving
does, so one model's thread settings do not leak into another's (TensorFlow 2's eager thread
settings are process-wide and frozen after first use). `Session.run` releases the GIL, and runs in
the adapter's thread pool so the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import LoadSpec, ModelAdapter
from adapters.tf_signature import signature_of
from gateway.errors import BackendError, InvalidInput, ModelNotReady
from gateway.types import ModelSignature

PLATFORM = "tensorflow_savedmodel"


class TensorFlowOptions(BaseModel):
    """The `tensorflow:` section of config.yaml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The SavedModel signature served, and the tags of the MetaGraph that holds it.
    signature: str = "serving_default"
    tags: tuple[str, ...] = ("serve",)
    # The version's own session thread pools; 0 lets TensorFlow choose (one thread per core).
    intra_op_threads: int = Field(default=1, ge=0)
    inter_op_threads: int = Field(default=1, ge=0)


def import_tensorflow(adapter: type[ModelAdapter], label: str) -> Any:
    """TensorFlow, imported when the first version that needs it loads."""
    # TensorFlow's C++ start-up chatter (CUDA probing, CPU features) is not the gateway's business.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return adapter.import_framework("tensorflow", label)


def savedmodel_dir(spec: LoadSpec) -> Path:
    """`model.savedmodel/`, or the version folder itself when it holds `saved_model.pb`."""
    artifact = spec.artifact
    if artifact is None:
        raise ModelNotReady(f"{spec.label}: no model.savedmodel/ or saved_model.pb in {spec.version_dir}")
    return artifact.parent if artifact.name == "saved_model.pb" else artifact


class TensorFlowAdapter(ModelAdapter):
    backend: ClassVar[str] = "tensorflow"
    artifacts: ClassVar[tuple[str, ...]] = ("model.savedmodel", "saved_model.pb")
    extra: ClassVar[str | None] = "tensorflow"
    options_model: ClassVar[type[BaseModel]] = TensorFlowOptions
    aliases: ClassVar[tuple[str, ...]] = ("tf",)
    packages: ClassVar[tuple[str, ...]] = ("tensorflow",)

    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        self._options: TensorFlowOptions = self.read_options(spec)
        self._tf: Any = None
        self._session: Any = None
        self._executor: ThreadPoolExecutor | None = None
        # signature key -> graph tensor name, for inputs and outputs
        self._feeds: dict[str, str] = {}
        self._fetches: dict[str, str] = {}

    async def load(self) -> None:
        path = savedmodel_dir(self.spec)
        self._executor = ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2),
            thread_name_prefix=f"tf-{self.spec.model_name}-{self.spec.version}",
        )
        loop = asyncio.get_running_loop()
        # TensorFlow takes seconds to import: off the event loop, with the session.
        tf, session, signature_def = await loop.run_in_executor(self._executor, self._load_session, path)
        self._feeds = {key: info.name for key, info in signature_def.inputs.items()}
        self._fetches = {key: info.name for key, info in signature_def.outputs.items()}
        self._signature = ModelSignature(
            inputs=signature_of(tf, signature_def.inputs, self.spec.config.inputs, self.spec.label),
            outputs=signature_of(tf, signature_def.outputs, self.spec.config.outputs, self.spec.label),
            platform=PLATFORM,
        )
        self._tf, self._session = tf, session

    def _load_session(self, path: Path) -> tuple[Any, Any, Any]:
        tf = import_tensorflow(type(self), self.spec.label)
        from tensorflow.python.saved_model import loader_impl

        options = self._options
        config = tf.compat.v1.ConfigProto(
            intra_op_parallelism_threads=options.intra_op_threads,
            inter_op_parallelism_threads=options.inter_op_threads,
        )
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=config)
        try:
            with graph.as_default():
                # What tf.compat.v1.saved_model.load does, without its deprecation notice: the
                # session API is kept for its per-call cost (one Session.run, no tf.function).
                loader = loader_impl.SavedModelLoader(str(path))
                meta_graph = loader.load(session, list(options.tags))
        except Exception as exc:  # a bad SavedModel surfaces as several unrelated TF and OS errors
            session.close()
            raise ModelNotReady(
                f"{self.spec.label}: TensorFlow cannot load the SavedModel in {path} "
                f"with tags {list(options.tags)}: {exc}"
            ) from exc
        signatures = meta_graph.signature_def
        if options.signature not in signatures:
            session.close()
            # Names like __saved_model_init_op are TensorFlow's own, not servable signatures.
            servable = sorted(name for name in signatures if not name.startswith("__"))
            raise ModelNotReady(
                f"{self.spec.label}: the SavedModel has no signature '{options.signature}'; "
                f"it has {', '.join(servable) or 'none'}"
            )
        return tf, session, signatures[options.signature]

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray[Any, Any]],
        output_names: Sequence[str],
        *,
        deadline: float | None = None,
    ) -> dict[str, np.ndarray[Any, Any]]:
        tf, session, executor = self._tf, self._session, self._executor
        if session is None or executor is None:
            raise ModelNotReady(f"{self.spec.label} is not loaded")
        feeds = {self._feeds[name]: array for name, array in inputs.items()}
        fetches = {name: self._fetches[name] for name in output_names}
        loop = asyncio.get_running_loop()
        try:
            results: dict[str, Any] = await loop.run_in_executor(executor, session.run, fetches, feeds)
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidInput(f"{self.spec.label}: TensorFlow rejected the input: {exc.message}") from exc
        except (ValueError, TypeError) as exc:  # Session.run checks feeds against the graph first
            raise InvalidInput(f"{self.spec.label}: TensorFlow rejected the input: {exc}") from exc
        except Exception as exc:  # any other failure inside the runtime is the backend's
            raise BackendError(f"{self.spec.label}: TensorFlow failed: {exc}") from exc
        return {name: np.asarray(value) for name, value in results.items()}

    async def ready(self) -> bool:
        return self._session is not None

    def process_id(self) -> int | None:
        return os.getpid()  # in-process

    async def aclose(self) -> None:
        session, self._session = self._session, None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        if session is not None:
            # Closing waits for runs in flight, so it happens off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, session.close)
