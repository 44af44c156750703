"""Rollouts around a request that routing has sent somewhere: fallback deployments that answer when
the model's own cannot, and shadow copies that run after the client has its answer and are
compared with it.

Both run a request through the data plane's own path (`Run`), so a fallback or a shadow is held
to the same checks, limits and metrics as any request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace

import numpy as np

from gateway.config import ShadowTarget
from gateway.context import RequestContext
from gateway.errors import BackendUnavailable, GatewayError, ModelNotFound, ModelNotReady
from gateway.metrics import Metrics
from gateway.registry import Registry
from gateway.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.rollouts")

# Shadow copies running at once; beyond this they are dropped (and counted), never queued.
MAX_SHADOWS_IN_FLIGHT = 64
SHADOW_PROTOCOL = "shadow"

Run = Callable[[InferRequest, RequestContext], Awaitable[InferResponse]]


class Rollouts:
    def __init__(
        self, registry: Registry, metrics: Metrics, run: Run, rng: random.Random | None = None
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._run = run
        self._rng = rng or random.Random()
        self._shadows: set[asyncio.Task[None]] = set()
        # The largest difference seen per (model, target), behind its gauge.
        self._worst: dict[tuple[str, str], float] = {}

    async def fall_back(
        self, request: InferRequest, context: RequestContext, cause: GatewayError
    ) -> InferResponse:
        """The answer of the first fallback deployment that gives one; else `cause` again.

        Only default routing falls back: a request that names a version or label wants that one.
        """
        model = self.registry.get(request.model_name)
        if request.model_version or context.label or not model.entry.config.fallback:
            raise cause
        for deployment in model.entry.config.fallback:
            try:
                response = await self._run(
                    replace(request, model_name=deployment, model_version=None), context
                )
            except (ModelNotReady, BackendUnavailable, ModelNotFound) as exc:
                log.warning(
                    "fallback %s for model '%s' cannot answer either: %s", deployment, model.name, exc
                )
                continue
            self.metrics.fallbacks.labels(model.name, deployment).inc()
            log.warning(
                "event=fallback request_id=%s model=%s to=%s detail=%r",
                context.request_id,
                model.name,
                deployment,
                cause.message,
            )
            response.parameters["deployment"] = deployment
            response.model_name = model.name
            return response
        raise cause

    def shadow(self, request: InferRequest, context: RequestContext, response: InferResponse) -> None:
        """Sends the model's shadow targets their share of copies; the client does not wait for them."""
        try:
            targets = self.registry.get(request.model_name).entry.config.shadow
        except GatewayError:
            return  # unloaded while the request ran
        for target in targets:
            if self._rng.random() * 100 >= target.percent:
                continue
            name = target.model or request.model_name
            if name == response.parameters.get("deployment"):
                continue  # answered by that deployment itself: nothing to compare
            label = f"{name}:{target.version}" if target.version else name
            if len(self._shadows) >= MAX_SHADOWS_IN_FLIGHT:
                self.metrics.shadow_requests.labels(request.model_name, label, "dropped").inc()
                continue
            copy = replace(request, model_name=name, model_version=target.version)
            copy_context = RequestContext(context.request_id, SHADOW_PROTOCOL)
            task = asyncio.create_task(
                self._compare(request.model_name, label, target, copy, copy_context, response)
            )
            self._shadows.add(task)
            task.add_done_callback(self._shadows.discard)

    async def _compare(
        self,
        model: str,
        label: str,
        target: ShadowTarget,
        request: InferRequest,
        context: RequestContext,
        primary: InferResponse,
    ) -> None:
        try:
            shadow = await self._run(request, context)
        except GatewayError as exc:
            self.metrics.shadow_requests.labels(model, label, "error").inc()
            log.info("shadow %s of model '%s' failed: %s", label, model, exc)
            return
        diff, matched = compare_outputs(primary, shadow, target.atol, target.rtol)
        self.metrics.shadow_abs_diff.labels(model, label).observe(diff)
        key = (model, label)
        if key not in self._worst or diff > self._worst[key]:
            self._worst[key] = diff
            self.metrics.shadow_worst_abs_diff.labels(model, label).set(diff)
        self.metrics.shadow_requests.labels(model, label, "match" if matched else "mismatch").inc()


def compare_outputs(
    primary: InferResponse, shadow: InferResponse, atol: float, rtol: float
) -> tuple[float, bool]:
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
