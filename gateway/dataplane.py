"""The one data plane: inference, metadata, health, statistics and repository control.

REST and gRPC both call these methods, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

import gateway
from gateway.breaker import BreakerStatus
from gateway.config import ShadowTarget, preferred_version
from gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    Draining,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    PermissionDenied,
    status_for,
)
from gateway.limits import Limiter, Priority
from gateway.metrics import Metrics
from gateway.registry import LoadedModel, LoadedVersion, Registry, State
from gateway.request_meta import client_deadline, current_request_id, priority, request_id
from gateway.routing import Router
from gateway.types import (
    Datatype,
    IndexEntry,
    InferRequest,
    InferResponse,
    ModelMetadata,
    Tensor,
    TensorSpec,
    VersionStats,
    datatype_of,
)

log = logging.getLogger("modelyard.dataplane")

# Shadow copies running at once; beyond this they are dropped (and counted), never queued.
MAX_SHADOWS_IN_FLIGHT = 64
# modelyard_breaker_state's value for each state a breaker enters.
_BREAKER_LEVEL = {"closed": 0, "half_open": 1, "open": 2}
EXTENSIONS = ("binary_tensor_data", "model_repository", "statistics", "model_configuration")
_TRITON_TYPE = {d: f"TYPE_{'STRING' if d is Datatype.BYTES else d.value}" for d in Datatype}


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    name: str
    version: str
    stats: VersionStats


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        router: Router,
        metrics: Metrics,
        rng: random.Random | None = None,
        *,
        global_limiter: Limiter | None = None,
        priority_header: str = "x-priority",
        enable_repository_api: bool = False,
    ) -> None:
        self.registry = registry
        self.enable_repository_api = enable_repository_api
        self.router = router
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._shadows: set[asyncio.Task[None]] = set()
        self._started = False
        self._draining = False
        # Across all models, behind each model's own limiter; None: no global cap.
        self._global_limiter = global_limiter
        self._priority_header = priority_header
        # Requests accepted and not yet answered, so a drain knows when it is done.
        self._accepted = 0
        self._idle = asyncio.Event()
        self._idle.set()
        registry.shared.breakers.observe = self._guard_event

    # Health -----------------------------------------------------------------------------------

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self._started and not self._draining

    def mark_started(self) -> None:
        self._started = True

    def begin_drain(self) -> None:
        """Readiness turns false and new requests are refused (503); accepted ones run on."""
        self._draining = True

    @property
    def accepted(self) -> int:
        """Inference requests accepted and not yet answered."""
        return self._accepted

    async def drained(self, timeout_s: float) -> bool:
        """Waits until every accepted request has its answer, up to `timeout_s`; whether they all did."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    def breakers(self) -> list[BreakerStatus]:
        """Every backend endpoint's circuit breaker: backend, endpoint, state, consecutive failures."""
        return self.registry.shared.breakers.statuses()

    def breaker_state(self, name: str, version: int) -> str | None:
        """The circuit breaker state of the endpoint a loaded version calls; None where it has none."""
        try:
            loaded = self.registry.get(name).versions.get(version)
        except GatewayError:
            return None
        guard = loaded.adapter.breaker() if loaded is not None and loaded.adapter is not None else None
        return None if guard is None else guard.state.value

    async def model_ready(self, name: str, version: str | None) -> bool:
        try:
            model = self.registry.get(name)
            loaded = self.router.select(model, version)
        except ModelNotReady:
            return False
        return await _backend_ready(loaded)

    async def model_status(self, name: str, version: str | None) -> list[IndexEntry]:
        """Each version's state, or only the one a version number or label names.

        A version the registry holds as ready whose backend says otherwise is reported UNAVAILABLE.
        """
        model = self.registry.get(name)
        if not model.versions:
            raise ModelNotReady(f"model '{name}' is not ready: {model.reason or 'no version loaded'}")
        numbers = [self.router.resolve(model, version)] if version else sorted(model.versions)
        entries = []
        for number in numbers:
            loaded = model.versions[number]
            state, reason = loaded.state.value, loaded.reason
            if loaded.ready and not await _backend_ready(loaded):
                state, reason = State.UNAVAILABLE.value, "the backend reports the version is not ready"
            entries.append(IndexEntry(name, str(number), state, reason))
        return entries

    # Metadata ---------------------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("modelyard", gateway.__version__, EXTENSIONS)

    async def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        model, loaded = self._for_metadata(name, version)
        assert loaded.signature is not None
        return ModelMetadata(
            name=name,
            versions=tuple(str(v) for v in model.ready_versions),
            platform=loaded.signature.platform,
            inputs=loaded.signature.inputs,
            outputs=loaded.signature.outputs,
        )

    def model_config(self, name: str, version: str | None) -> dict[str, Any]:
        """The model's configuration in the shape of Triton's model configuration extension."""
        model, loaded = self._for_metadata(name, version)
        assert loaded.signature is not None
        policy = model.entry.config.version_policy
        if policy.all:
            version_policy: dict[str, Any] = {"all": {}}
        elif policy.specific is not None:
            version_policy = {"specific": {"versions": list(policy.specific)}}
        else:
            version_policy = {"latest": {"num_versions": policy.latest or 1}}
        return {
            "name": name,
            "platform": loaded.signature.platform,
            "backend": loaded.backend,
            "version_policy": version_policy,
            "max_batch_size": model.entry.config.batching.max_batch_size,
            "input": [_triton_tensor(spec) for spec in loaded.signature.inputs],
            "output": [_triton_tensor(spec) for spec in loaded.signature.outputs],
        }

    def _for_metadata(self, name: str, version: str | None) -> tuple[LoadedModel, LoadedVersion]:
        model = self.registry.get(name)
        if version:
            return model, self.router.select(model, version)
        # Metadata must not depend on a traffic draw.
        chosen = preferred_version(model.entry.config, model.ready_versions)
        if chosen is None:
            return model, self.router.select(model, None)
        return model, model.versions[chosen]

    # Inference --------------------------------------------------------------------------------

    async def infer(self, request: InferRequest) -> InferResponse:
        """Runs the request on the version routing picks; on a fallback deployment when that one
        is not ready; then sends shadow copies, which the client does not wait for.

        Every error leaves with the request's id, and every fault is counted and logged with it.
        """
        if request.request_id is None:
            request.request_id = request_id(None, request.id)
        if self._draining:
            error: GatewayError = Draining("the gateway is shutting down and takes no new requests")
            self._record_fault(request, error)
            raise error
        self._accepted += 1
        self._idle.clear()
        current_request_id.set(request.request_id)
        try:
            try:
                response = await self._infer_routed(request)
            except (ModelNotReady, BackendUnavailable) as exc:
                response = await self._fall_back(request, exc)
        except GatewayError as exc:
            self._record_fault(request, exc)
            raise
        finally:
            self._accepted -= 1
            if not self._accepted:
                self._idle.set()
        self._send_shadows(request, response)
        return response

    def _guard_event(self, backend: str, endpoint: str, event: str, detail: str) -> None:
        """A backend endpoint's retry or breaker change: its metric and its log line."""
        if event == "retry":
            self.metrics.backend_retries.labels(backend, endpoint).inc()
        else:
            self.metrics.breaker_transitions.labels(backend, endpoint, event).inc()
            self.metrics.breaker_state.labels(backend, endpoint).set(_BREAKER_LEVEL[event])
        log.warning(
            "event=%s request_id=%s backend=%s endpoint=%s detail=%r",
            event if event == "retry" else f"breaker_{event}",
            current_request_id.get() or "",
            backend,
            endpoint,
            detail,
        )

    def _record_fault(self, request: InferRequest, error: GatewayError) -> None:
        """The metric and the log line of a request that got no answer."""
        error.request_id = request.request_id
        if isinstance(error, Overloaded):
            event, reason, level = "rejected", f"{error.limit}_limit", logging.INFO
            self.metrics.rejections.labels(request.model_name, reason).inc()
        elif isinstance(error, Draining):
            event, reason, level = "rejected", "draining", logging.INFO
            self.metrics.rejections.labels(request.model_name, reason).inc()
        elif isinstance(error, (ModelNotReady, BackendUnavailable)):
            event, reason, level = "rejected", "unavailable", logging.WARNING
            self.metrics.rejections.labels(request.model_name, reason).inc()
        elif isinstance(error, DeadlineExceeded):
            event, reason, level = "timeout", error.stage, logging.WARNING
            self.metrics.timeouts.labels(request.model_name, reason).inc()
        else:
            return  # the request's own fault (bad input) or a backend error: counted in modelyard_requests
        log.log(
            level,
            "event=%s reason=%s request_id=%s model=%s version=%s protocol=%s detail=%r",
            event,
            reason,
            request.request_id,
            request.model_name,
            request.model_version or "",
            request.protocol,
            error.message,
        )

    async def _fall_back(self, request: InferRequest, cause: GatewayError) -> InferResponse:
        model = self.registry.get(request.model_name)
        # A request that names a version or label wants that one: only default routing falls back.
        if request.model_version or not model.entry.config.fallback:
            raise cause
        for deployment in model.entry.config.fallback:
            try:
                response = await self._infer_routed(
                    replace(request, model_name=deployment, model_version=None)
                )
            except (ModelNotReady, BackendUnavailable, ModelNotFound) as exc:
                log.warning(
                    "fallback %s for model '%s' cannot answer either: %s", deployment, model.name, exc
                )
                continue
            self.metrics.fallbacks.labels(model.name, deployment).inc()
            log.warning(
                "event=fallback request_id=%s model=%s to=%s detail=%r",
                request.request_id,
                model.name,
                deployment,
                cause.message,
            )
            response.parameters["deployment"] = deployment
            response.model_name = model.name
            return response
        raise cause

    def _send_shadows(self, request: InferRequest, response: InferResponse) -> None:
        try:
            targets = self.registry.get(request.model_name).entry.config.shadow
        except GatewayError:
            return  # unloaded while the request ran
        for target in targets:
            if self._rng.random() * 100 >= target.percent:
                continue
            name = target.model or request.model_name
            label = f"{name}:{target.version}" if target.version else name
            if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
                self.metrics.shadow_requests.labels(request.model_name, label, "dropped").inc()
                continue
            copy = replace(
                request,
                model_name=name,
                model_version=target.version,
                protocol="shadow",
                headers={},
                deadline=None,
            )
            task = asyncio.create_task(self._shadow(request.model_name, label, target, copy, response))
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _shadow(
        self, model: str, label: str, target: ShadowTarget, request: InferRequest, primary: InferResponse
    ) -> None:
        try:
            shadow = await self._infer_routed(request)
        except GatewayError as exc:
            self.metrics.shadow_requests.labels(model, label, "error").inc()
            log.info("shadow %s of model '%s' failed: %s", label, model, exc)
            return
        diff, matched = _compare(primary, shadow, target.atol, target.rtol)
        self.metrics.shadow_abs_diff.labels(model, label).observe(diff)
        self.metrics.shadow_requests.labels(model, label, "match" if matched else "mismatch").inc()

    async def _infer_routed(self, request: InferRequest) -> InferResponse:
        arrived = time.perf_counter_ns()
        model = self.registry.get(request.model_name)
        loaded = self.router.select(model, request.model_version, request.headers, request.parameters)
        # Counted before the first await: a reload closes this version only once it reaches zero.
        loaded.inflight += 1
        try:
            if not await _backend_ready(loaded):
                raise ModelNotReady(
                    f"model '{model.name}' version {loaded.version}: its {loaded.backend} backend is not ready"
                )
            labels = (model.name, str(loaded.version), loaded.backend, request.protocol)
            stats = loaded.stats
            try:
                response = await self._infer(model, loaded, request, stats, labels)
            except GatewayError as exc:
                self._count(labels, str(status_for(exc)[0]), arrived, stats, ok=False)
                raise
            except Exception:
                self._count(labels, "500", arrived, stats, ok=False)
                raise
            self._count(labels, "200", arrived, stats, ok=True)
            return response
        finally:
            loaded.inflight -= 1

    async def _infer(
        self,
        model: LoadedModel,
        loaded: LoadedVersion,
        request: InferRequest,
        stats: VersionStats,
        labels: tuple[str, str, str, str],
    ) -> InferResponse:
        assert loaded.signature is not None and loaded.adapter is not None
        started = time.perf_counter_ns()
        inputs = _check_inputs(model.name, loaded, request)
        output_names = _check_outputs(model.name, loaded, request)
        stats.compute_input.add(time.perf_counter_ns() - started)

        deadline = _deadline(request, model)
        level = (
            priority(request.headers, self._priority_header, request.parameters)
            if request.headers or request.parameters
            else Priority.NORMAL
        )
        limiter = model.limiter
        queued_at = time.perf_counter_ns()
        self.metrics.queued.labels(model.name).set(limiter.queued + 1)
        try:
            await limiter.acquire(deadline, level)
        finally:
            self.metrics.queued.labels(model.name).set(limiter.queued)
        slots = [limiter]
        if self._global_limiter is not None:
            try:
                await self._global_limiter.acquire(deadline, level)
            except BaseException:
                limiter.release()
                raise
            slots.append(self._global_limiter)
        queue_ns = time.perf_counter_ns() - queued_at
        stats.queue.add(queue_ns)
        self.metrics.queue_duration.labels(*labels).observe(queue_ns / 1e9)
        self.metrics.inflight.labels(model.name).set(limiter.inflight)

        compute_started = time.perf_counter_ns()
        if deadline is None:
            # No deadline: await the backend directly, without a task to watch.
            try:
                results = await loaded.adapter.infer(inputs, output_names)
            finally:
                _release(slots)
        else:
            task = asyncio.ensure_future(loaded.adapter.infer(inputs, output_names, deadline=deadline))
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                # The backend call cannot be recalled; its slots free when it really finishes, so
                # a slow backend never gets more calls than the limits allow.
                task.add_done_callback(lambda finished: _release_late(slots, finished))
                raise DeadlineExceeded(
                    f"model '{model.name}' version {loaded.version}: no answer before the deadline"
                )
            _release(slots)
            results = task.result()
        self.metrics.inflight.labels(model.name).set(limiter.inflight)
        compute_ns = time.perf_counter_ns() - compute_started
        stats.compute_infer.add(compute_ns)
        self.metrics.compute_duration.labels(*labels).observe(compute_ns / 1e9)
        stats.inference_count += _batch_size(request)
        stats.execution_count += 1

        requested = {o.name: o.parameters for o in request.outputs or ()}
        outputs = [
            Tensor(name, datatype_of(array.dtype), tuple(array.shape), array, dict(requested.get(name, {})))
            for name, array in results.items()
        ]
        return InferResponse(
            model_name=model.name,
            model_version=str(loaded.version),
            outputs=outputs,
            id=request.id,
        )

    def _count(
        self, labels: tuple[str, str, str, str], code: str, arrived: int, stats: VersionStats, ok: bool
    ) -> None:
        elapsed = time.perf_counter_ns() - arrived
        self.metrics.requests.labels(*labels, code).inc()
        self.metrics.request_duration.labels(*labels).observe(elapsed / 1e9)
        (stats.success if ok else stats.fail).add(elapsed)
        stats.last_inference_ms = int(time.time() * 1000)

    # Statistics and repository ----------------------------------------------------------------

    def statistics(self, name: str | None, version: str | None) -> list[ModelStatistics]:
        models = [self.registry.get(name)] if name else self.registry.models()
        rows: list[ModelStatistics] = []
        for model in models:
            versions = sorted(model.versions.values(), key=lambda v: v.version)
            if name and version:
                versions = [self.router.select(model, version)]
            rows.extend(ModelStatistics(model.name, str(v.version), v.stats) for v in versions)
        return rows

    async def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        """The registry's index, with loaded versions whose backend is down shown UNAVAILABLE."""
        entries = []
        for entry in self.registry.index():
            if entry.state == State.READY.value and entry.version:
                loaded = self.registry.get(entry.name).versions[int(entry.version)]
                if not await _backend_ready(loaded):
                    entry = IndexEntry(
                        entry.name,
                        entry.version,
                        State.UNAVAILABLE.value,
                        f"{loaded.backend} backend is not ready",
                    )
            if not ready_only or entry.state == State.READY.value:
                entries.append(entry)
        return entries

    async def load_model(self, name: str) -> None:
        self._check_repository_api("load", name)
        await self.registry.load(name)

    async def unload_model(self, name: str) -> None:
        self._check_repository_api("unload", name)
        await self.registry.unload(name)

    def _check_repository_api(self, action: str, name: str) -> None:
        # 403, not 501: the gateway can do it, and its operator has chosen not to let clients.
        if not self.enable_repository_api:
            raise PermissionDenied(
                f"cannot {action} model '{name}': the repository API is disabled; start the gateway "
                "with --enable-repository-api (MODELYARD_ENABLE_REPOSITORY_API=true) to allow it"
            )

    async def load_all(self) -> None:
        await self.registry.load_all()


def _compare(primary: InferResponse, shadow: InferResponse, atol: float, rtol: float) -> tuple[float, bool]:
    """The largest absolute difference over the outputs both have, and whether they agree."""
    theirs = {t.name: t for t in shadow.outputs}
    largest, matched = 0.0, True
    for mine in primary.outputs:
        other = theirs.get(mine.name)
        if other is None or other.data.shape != mine.data.shape:
            matched = False
            continue
        if mine.data.dtype == object or other.data.dtype == object:
            matched = matched and bool(np.array_equal(mine.data, other.data))
            continue
        a, b = mine.data.astype(np.float64), other.data.astype(np.float64)
        if a.size:
            largest = max(largest, float(np.max(np.abs(a - b))))
        matched = matched and bool(np.allclose(b, a, rtol=rtol, atol=atol))
    return largest, matched


async def _backend_ready(loaded: LoadedVersion) -> bool:
    return loaded.ready and loaded.adapter is not None and await loaded.adapter.ready()


def _release(slots: list[Limiter]) -> None:
    for limiter in reversed(slots):
        limiter.release()


def _release_late(slots: list[Limiter], task: asyncio.Future[Any]) -> None:
    _release(slots)
    if not task.cancelled():
        task.exception()  # retrieved, so asyncio does not log it as lost


def _triton_tensor(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "data_type": _TRITON_TYPE[spec.datatype], "dims": list(spec.shape)}


def _check_inputs(name: str, loaded: LoadedVersion, request: InferRequest) -> dict[str, np.ndarray[Any, Any]]:
    assert loaded.signature is not None
    label = f"model '{name}' version {loaded.version}"
    specs = {spec.name: spec for spec in loaded.signature.inputs}
    inputs: dict[str, np.ndarray[Any, Any]] = {}
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"{label} has no input '{tensor.name}'; its inputs are {', '.join(specs)}")
        if tensor.name in inputs:
            raise InvalidInput(f"{label}: input '{tensor.name}' is given twice")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(
                f"{label}: input '{tensor.name}' has datatype {tensor.datatype}, the model expects {spec.datatype}"
            )
        if not spec.accepts_shape(tensor.shape):
            raise InvalidInput(
                f"{label}: input '{tensor.name}' has shape {list(tensor.shape)}, the model expects "
                f"{list(spec.shape)} (-1 is any size)"
            )
        inputs[tensor.name] = tensor.data
    missing = [n for n in specs if n not in inputs]
    if missing:
        raise InvalidInput(f"{label}: missing input(s) {', '.join(missing)}")
    return inputs


def _check_outputs(name: str, loaded: LoadedVersion, request: InferRequest) -> list[str]:
    assert loaded.signature is not None
    known = [spec.name for spec in loaded.signature.outputs]
    if not request.outputs:
        return known
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise InvalidInput(
            f"model '{name}' version {loaded.version} has no output(s) {', '.join(unknown)}; "
            f"its outputs are {', '.join(known)}"
        )
    if len(set(names)) != len(names):
        raise InvalidInput(f"model '{name}' version {loaded.version}: an output is requested twice")
    return names


def _deadline(request: InferRequest, model: LoadedModel) -> float | None:
    """The soonest of the client's deadline (gRPC's own, or a REST timeout) and the model's
    `limits.timeout_ms`, which caps what a client may ask for."""
    timeout_ms = model.entry.config.limits.timeout_ms
    own = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
    asked = (
        client_deadline(request.headers, request.parameters)
        if request.headers or request.parameters
        else None
    )
    candidates = [d for d in (request.deadline, asked, own) if d is not None]
    return min(candidates) if candidates else None


def _batch_size(request: InferRequest) -> int:
    first = request.inputs[0] if request.inputs else None
    return first.shape[0] if first is not None and first.shape else 1
