"""The one data plane: inference, metadata, health, statistics and repository control.

Every front door calls these methods with a decoded request and its parsed RequestContext, so
the protocols cannot drift apart. A request is routed once; fallback and shadow copies are the
rollouts module's (gateway/rollouts.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import gateway
from gateway.cache import cache_key
from gateway.config import preferred_version
from gateway.context import RequestContext, current_request_id
from gateway.errors import (
    BackendUnavailable,
    DeadlineExceeded,
    Draining,
    GatewayError,
    ModelNotFound,
    ModelNotReady,
    PermissionDenied,
    without_server_paths,
)
from gateway.limits import Limiter, acquire_all, release_all, release_late, take_free
from gateway.loaded import LoadedModel, LoadedVersion, State
from gateway.metrics import Metrics
from gateway.outcomes import GRPC_PROTOCOLS, Outcomes, Served, code_of
from gateway.payload_log import PayloadLogs
from gateway.recording import Recorder
from gateway.registry import Registry
from gateway.request_series import RequestSeries
from gateway.rollouts import SHADOW_PROTOCOL, Rollouts
from gateway.routing import Route, Router
from gateway.timing import RequestTiming, current_timing
from gateway.tracing import RequestTrace, Tracer, current_trace
from gateway.types import (
    IndexEntry,
    InferRequest,
    InferResponse,
    ModelDescription,
    ModelMetadata,
    ModelStatistics,
    ServerMetadata,
    Tensor,
    VersionStats,
    batch_rows,
    datatype_of,
)

log = logging.getLogger("modelyard.dataplane")

EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "statistics",
    "model_configuration",
    "system_shared_memory",
)


class DataPlane:
    def __init__(
        self,
        registry: Registry,
        router: Router,
        metrics: Metrics,
        *,
        global_limiter: Limiter | None = None,
        enable_repository_api: bool = False,
        tracer: Tracer | None = None,
        payloads: PayloadLogs | None = None,
        recorder: Recorder | None = None,
    ) -> None:
        self.registry = registry
        self.router = router
        self.metrics = metrics
        self.enable_repository_api = enable_repository_api
        self.rollouts = Rollouts(registry, metrics, self._run_alone)
        self.outcomes = Outcomes(registry, metrics)
        # None: tracing is off, and the request path makes no tracer call.
        self.tracer = tracer
        # Where a model's `payload_log` sends its sampled requests and responses.
        self.payloads = payloads
        # Where a model's `record` keeps the inputs of its sampled requests.
        self.recorder = recorder
        # Across all models, behind each model's own limiter; None: no global cap.
        self._global_limiter = global_limiter
        self._started = False
        self._draining = False
        # Requests accepted and not yet answered, so a drain knows when it is done.
        self._accepted = 0
        self._idle = asyncio.Event()
        self._idle.set()

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

    async def model_ready(self, name: str, version: str | None) -> bool:
        """Whether a request would be served: a version that loads on demand is ready in that sense,
        since its request waits for the load."""
        try:
            loaded = self.router.select(self.registry.get(name), version)
        except ModelNotReady:
            return False
        return loaded.loadable or await _backend_ready(loaded)

    async def model_status(self, name: str, version: str | None) -> list[IndexEntry]:
        """Each version's state, or only the one a version number or label names; a version the
        registry holds as ready whose backend says otherwise is UNAVAILABLE."""
        model = self.registry.get(name)
        if not model.versions:
            raise ModelNotReady(f"model '{name}' is not ready: {model.reason or 'no version loaded'}")
        numbers = [self.router.resolve(model, version)] if version else sorted(model.versions)
        return [await _entry(name, model.versions[number]) for number in numbers]

    # Metadata ---------------------------------------------------------------------------------

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("modelyard", gateway.__version__, EXTENSIONS)

    async def model_metadata(self, name: str, version: str | None) -> ModelMetadata:
        route = await self._for_metadata(name, version)
        signature = route.signature
        return ModelMetadata(
            name=name,
            version=str(route.loaded.version),
            versions=tuple(str(v) for v in route.model.servable_versions),
            platform=signature.platform,
            inputs=signature.inputs,
            outputs=signature.outputs,
        )

    async def model_description(self, name: str, version: str | None) -> ModelDescription:
        route = await self._for_metadata(name, version)
        config = route.model.entry.config
        return ModelDescription(
            name, route.loaded.backend, config.version_policy, config.batching.max_batch_size, route.signature
        )

    async def _for_metadata(self, name: str, version: str | None) -> Route:
        """The version metadata describes. One that is not resident answers from the signature of
        its last load; one never loaded yet loads first, as a request would have it load."""
        model = self.registry.get(name)
        if version:
            loaded = self.router.select(model, version)
        else:
            # Metadata must not depend on a traffic draw: the version the model stands for.
            chosen = preferred_version(model.entry.config, model.servable_versions)
            loaded = self.router.select(model, None) if chosen is None else model.versions[chosen]
        if loaded.signature is None:
            await self.registry.make_resident(model, loaded, None)
        return Route(model, loaded)

    # Inference --------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, context: RequestContext) -> InferResponse:
        """Runs the request where routing sends it; on a fallback deployment when that version is
        not ready; then sends shadow copies, which the client does not wait for.

        Each request is counted once, with the status it got; every error leaves with its id.
        """
        started = time.perf_counter_ns()
        served = Served(request.model_name)
        trace = None if self.tracer is None else self.tracer.start(context, started)
        current_request_id.set(context.request_id)
        self._accepted += 1
        self._idle.clear()
        try:
            if self._draining:
                raise Draining("the gateway is shutting down and takes no new requests")
            try:
                response = await self._run(request, context, served, trace)
            except (ModelNotReady, BackendUnavailable) as exc:
                response = await self.rollouts.fall_back(request, context, exc)
                served = Served(response.parameters["deployment"], response.model_version, response.backend)
        except GatewayError as exc:
            exc.request_id = context.request_id
            self.outcomes.refused(request, served, context, exc, started)
            if trace is not None:
                _finish(trace, served, code_of(exc, context), exc)
            raise
        except Exception as exc:
            self.outcomes.failed(served, context, started)
            if trace is not None:
                _finish(trace, served, "INTERNAL" if context.protocol in GRPC_PROTOCOLS else "500", exc)
            raise
        finally:
            self._accepted -= 1
            if not self._accepted:
                self._idle.set()
        self.outcomes.answered(served, context, started)
        if trace is not None:
            _finish(trace, served, code_of(None, context), None)
        self.rollouts.shadow(request, context, response)
        return response

    async def _run_alone(self, request: InferRequest, context: RequestContext) -> InferResponse:
        """A fallback's or a shadow's run: routed afresh, counted by itself when it is a shadow."""
        served = Served(request.model_name)
        if context.protocol != SHADOW_PROTOCOL:
            return await self._run(request, context, served)
        started = time.perf_counter_ns()
        try:
            response = await self._run(request, context, served)
        except GatewayError as exc:
            self.outcomes.counted(served, context, exc, started)
            raise
        self.outcomes.answered(served, context, started)
        return response

    async def _run(
        self,
        request: InferRequest,
        context: RequestContext,
        served: Served,
        trace: RequestTrace | None = None,
    ) -> InferResponse:
        source = self.registry.get(request.model_name)
        route = await self._route(source, request, context)
        model, loaded = route.model, route.loaded
        served.model, served.version, served.backend = model.name, str(loaded.version), loaded.backend
        series = self.metrics.series(model.name, served.version, loaded.backend, context.protocol)
        stats = loaded.stats
        arrived = time.perf_counter_ns()
        deadline = context.deadline_within(model.entry.config.limits.timeout_ms)
        timing = RequestTiming(series=series)
        current_timing.set(timing)
        # Counted before the first await: a reload closes this version, and the memory budget
        # unloads it, only once it is back to zero.
        loaded.inflight += 1
        loaded.last_used = time.monotonic()
        try:
            if not loaded.ready:
                self.metrics.load_waits.labels(model.name).inc()
                loading = time.perf_counter_ns()
                await self.registry.make_resident(model, loaded, deadline)
                timing.load_ns = time.perf_counter_ns() - loading
            if not await _backend_ready(loaded):
                raise ModelNotReady(f"{route.label}: its {loaded.backend} backend is not ready")
            # A front door that decodes against the signature does it here, against this version's.
            tensors = request.inputs if request.decode is None else request.decode(route.signature)
            response = await self._compute(route, request, tensors, context, timing, deadline, trace)
        except GatewayError:
            self._observe(stats, series, arrived, ok=False)
            raise
        finally:
            loaded.inflight -= 1
            loaded.last_used = time.monotonic()
            if trace is not None:
                # A backend call that raised is still open: it ends here, failed, and what runs
                # next (a fallback) is not its child.
                current_trace.set(None)
                trace.end_backend_call(time.perf_counter_ns(), failed=True)
        self._observe(stats, series, arrived, ok=True)
        timing.observe_backend()
        response.timing = timing
        if model is not source:
            # Answered by the deployment the split drew: under the name the client asked for.
            response.model_name = source.name
            response.parameters["deployment"] = model.name
        if context.protocol != SHADOW_PROTOCOL:
            logged = model.entry.config.payload_log
            if logged is not None and self.payloads is not None:
                self.payloads.offer(logged, context, model.name, served.version, tensors, response.outputs)
            recorded = source.entry.config.record
            if recorded is not None and self.recorder is not None:
                self.recorder.offer(recorded, source.name, tensors)
        return response

    async def _route(self, source: LoadedModel, request: InferRequest, context: RequestContext) -> Route:
        """The version that serves the request: on the deployment the model's split draws, when
        that one can take it now; else on the model itself, as routing picks."""
        keys, label = context.routing_keys, context.label
        target = self.router.split_target(source, request.model_version, keys, label)
        if target is not None:
            try:
                other = self.registry.get(target)
                loaded = self.router.select(other, None, keys)
                if loaded.ready and not await _backend_ready(loaded):
                    raise ModelNotReady(f"its {loaded.backend} backend is not ready")
            except (ModelNotFound, ModelNotReady):
                self.metrics.split_requests.labels(source.name, target, "unavailable").inc()
            else:
                self.metrics.split_requests.labels(source.name, target, "sent").inc()
                return Route(other, loaded)
        return Route(source, self.router.select(source, request.model_version, keys, label))

    @staticmethod
    def _observe(stats: VersionStats, series: RequestSeries, arrived: int, ok: bool) -> None:
        elapsed = time.perf_counter_ns() - arrived
        (stats.success if ok else stats.fail).add(elapsed)
        stats.last_inference_ms = int(time.time() * 1000)
        series.duration.observe(elapsed / 1e9)

    async def _compute(
        self,
        route: Route,
        request: InferRequest,
        tensors: list[Tensor],
        context: RequestContext,
        timing: RequestTiming,
        deadline: float | None,
        trace: RequestTrace | None = None,
    ) -> InferResponse:
        model, loaded = route.model, route.loaded
        stats, series = loaded.stats, timing.series
        assert series is not None
        adapter = loaded.adapter
        assert adapter is not None
        checked = time.perf_counter_ns()
        label = route.label
        inputs = route.signature.check_inputs(label, tensors)
        output_names = route.signature.check_outputs(label, request.outputs)
        queued = time.perf_counter_ns()
        stats.compute_input.add(queued - checked)
        # The version's response cache, where its config has one; shadow copies never touch it.
        cache = loaded.cache if context.protocol != SHADOW_PROTOCOL else None
        key = b""
        if cache is not None:
            key = cache_key(inputs, output_names)
            cached = cache.get(key)
            looked = time.perf_counter_ns()
            outcome = "miss" if cached is None else "hit"
            self.metrics.cache_lookups.labels(model.name, str(loaded.version), outcome).inc()
            if cached is not None:
                stats.cache_hit.add(looked - queued)
                stats.inference_count += batch_rows(tensors)
                return _response(route, request, cached)
            stats.cache_miss.add(looked - queued)
            queued = looked

        slots = (model.limiter,) if self._global_limiter is None else (model.limiter, self._global_limiter)
        if not take_free(slots):
            await acquire_all(slots, deadline, context.priority)
        timing.batch_ns = None  # only this call's batch wait (a warmup at an on-demand load sets one)
        computing = time.perf_counter_ns()
        stats.queue.add(computing - queued)
        series.queue.observe((computing - queued) / 1e9)
        if trace is not None:
            trace.phase("queue", queued, computing)
            trace.begin_backend_call(loaded.backend, computing)
            # The backend call (and a batching wrapper in it) reads the trace from its task.
            current_trace.set(trace)
        if deadline is None:
            # No deadline: await the backend directly, without a task to watch.
            try:
                results = await adapter.infer(inputs, output_names)
            finally:
                release_all(slots)
        else:
            task = asyncio.ensure_future(adapter.infer(inputs, output_names, deadline=deadline))
            done, _ = await asyncio.wait({task}, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                # The backend call cannot be recalled; its slots free when it really finishes, so
                # a slow backend never gets more calls than the limits allow.
                task.add_done_callback(lambda finished: release_late(slots, finished))
                raise DeadlineExceeded(f"{route.label}: no answer before the deadline")
            release_all(slots)
            results = task.result()
        computed = time.perf_counter_ns()
        if trace is not None:
            current_trace.set(None)
            trace.end_backend_call(computed, failed=False)
        compute_ns = computed - computing
        # A batched request's wait for its batch is the batching wrapper's to measure.
        timing.queue_ns, timing.backend_ns = computing - queued, compute_ns - (timing.batch_ns or 0)
        stats.compute_infer.add(compute_ns)
        series.compute.observe(compute_ns / 1e9)
        stats.inference_count += batch_rows(tensors)
        stats.execution_count += 1
        if cache is not None:
            cache.put(key, results)
        return _response(route, request, results)

    # Statistics and repository ----------------------------------------------------------------

    def statistics(
        self, name: str | None, version: str | None, visible: Callable[[str], bool] | None = None
    ) -> list[ModelStatistics]:
        """One model's rows, or (no name) every model's that `visible` lets the caller see."""
        if name:
            models = [self.registry.get(name)]
        else:
            models = [m for m in self.registry.models() if visible is None or visible(m.name)]
        rows: list[ModelStatistics] = []
        for model in models:
            versions = sorted(model.versions.values(), key=lambda v: v.version)
            if name and version:
                versions = [self.router.select(model, version)]
            rows.extend(ModelStatistics(model.name, str(v.version), v.stats) for v in versions)
        return rows

    async def repository_index(
        self, ready_only: bool = False, visible: Callable[[str], bool] | None = None
    ) -> list[IndexEntry]:
        """The registry's index (the models `visible` lets the caller see), with loaded versions
        whose backend is down shown UNAVAILABLE; reasons name no server path."""
        entries = []
        for entry in self.registry.index():
            if visible is not None and not visible(entry.name):
                continue
            if entry.state == State.READY.value and entry.version:
                entry = await _entry(entry.name, self.registry.get(entry.name).versions[int(entry.version)])
            if not ready_only or entry.state == State.READY.value:
                entries.append(replace(entry, reason=without_server_paths(entry.reason)))
        return entries

    async def load_model(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """A repository load; `config` (config.yaml keys) stands in for the file's, as Triton's load
        with a config does."""
        self._check_repository_api("load", name)
        await self.registry.load_from_api(name, config)

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


def _finish(trace: RequestTrace, served: Served, status: str, error: BaseException | None) -> None:
    current_trace.set(None)
    trace.finish(served.model, served.version, served.backend, status, error)


async def _backend_ready(loaded: LoadedVersion) -> bool:
    return loaded.ready and loaded.adapter is not None and await loaded.adapter.ready()


async def _entry(name: str, loaded: LoadedVersion) -> IndexEntry:
    if loaded.ready and not await _backend_ready(loaded):
        return IndexEntry(
            name, str(loaded.version), State.UNAVAILABLE.value, f"{loaded.backend} backend is not ready"
        )
    return IndexEntry(name, str(loaded.version), loaded.state.value, without_server_paths(loaded.reason))


def _response(route: Route, request: InferRequest, results: Mapping[str, Any]) -> InferResponse:
    requested = {o.name: o.parameters for o in request.outputs or ()}
    outputs = [
        Tensor(name, datatype_of(array.dtype), tuple(array.shape), array, dict(requested.get(name, {})))
        for name, array in results.items()
    ]
    loaded = route.loaded
    return InferResponse(
        route.model.name, str(loaded.version), outputs, id=request.id, backend=loaded.backend
    )
