"""Open Inference Protocol v2 over REST, with Triton's binary tensor data extension.

This module only translates between HTTP and the data plane's types; the infer body's decoding
and encoding are in gateway/protocols/v2_rest_codec.py.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response

from gateway.auth import request_access
from gateway.codec import (
    DEFAULT_LIMITS,
    InputLimits,
)
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, request_id
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, MalformedRequest
from gateway.protocols.openapi import V2_REPOSITORY_INDEX_REQUEST, V2_REPOSITORY_LOAD_REQUEST, request_body
from gateway.protocols.shared_memory import NO_SHARED_MEMORY, SharedMemoryRegions
from gateway.protocols.triton import load_parameters
from gateway.protocols.triton import model_config as triton_model_config
from gateway.protocols.v2_json import decompress, json_object
from gateway.protocols.v2_rest_codec import (
    HEADER_LENGTH,
    RESPONSE_ID_HEADER,
    Answer,
    decode_infer_request,
    encode_infer_response,
    json_response,
)
from gateway.timing import SERVER_TIMING
from gateway.types import (
    Duration,
    ModelStatistics,
)

__all__ = [
    "HEADER_LENGTH",
    "RESPONSE_ID_HEADER",
    "decode_infer_request",
    "encode_infer_response",
    "infer",
    "json_response",
    "v2_router",
]

Endpoint = TypeVar("Endpoint", bound=Callable[..., Awaitable[Response]])


def v2_router(dataplane: DataPlane, limits: InputLimits = DEFAULT_LIMITS) -> APIRouter:
    router = APIRouter()

    def route(
        method: str, path: str, versioned: bool = True, body: dict[str, Any] | None = None
    ) -> Callable[[Endpoint], Endpoint]:
        def register(endpoint: Endpoint) -> Endpoint:
            router.add_api_route(
                path.replace("{model}", "/v2/models/{model_name}"),
                endpoint,
                methods=[method],
                openapi_extra=body,
            )
            if versioned:
                versioned_path = path.replace("{model}", "/v2/models/{model_name}/versions/{model_version}")
                router.add_api_route(versioned_path, endpoint, methods=[method], openapi_extra=body)
            return endpoint

        return register

    @route("GET", "/v2/health/live", versioned=False)
    async def live() -> Response:
        live = dataplane.live()
        return json_response({"live": live}, 200 if live else 503)

    @route("GET", "/v2/health/ready", versioned=False)
    async def ready() -> Response:
        ready = dataplane.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    @route("GET", "/v2", versioned=False)
    async def server_metadata() -> Response:
        meta = dataplane.server_metadata()
        return json_response(
            {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}
        )

    # Before the model routes, which would take 'stats' for a model name.
    @route("GET", "/v2/models/stats", versioned=False)
    async def all_stats() -> Response:
        return json_response(_statistics(dataplane.statistics(None, None, visible=request_access.get().sees)))

    @route("GET", "{model}/ready")
    async def model_ready(model_name: str, model_version: str | None = None) -> Response:
        ready = await dataplane.model_ready(model_name, model_version)
        return json_response({"name": model_name, "ready": ready}, 200 if ready else 503)

    @route("GET", "{model}")
    async def model_metadata(model_name: str, model_version: str | None = None) -> Response:
        meta = await dataplane.model_metadata(model_name, model_version)
        return json_response(
            {
                "name": meta.name,
                "versions": list(meta.versions),
                "platform": meta.platform,
                "inputs": [_tensor_metadata(s) for s in meta.inputs],
                "outputs": [_tensor_metadata(s) for s in meta.outputs],
            }
        )

    @route("GET", "{model}/config")
    async def model_config(model_name: str, model_version: str | None = None) -> Response:
        return json_response(
            triton_model_config(await dataplane.model_description(model_name, model_version))
        )

    @route("GET", "{model}/stats")
    async def model_stats(model_name: str, model_version: str | None = None) -> Response:
        return json_response(_statistics(dataplane.statistics(model_name, model_version)))

    # POST {model}/infer is served by `infer`, mounted by the HTTP app ahead of this router.

    @route(
        "POST", "/v2/repository/index", versioned=False, body=request_body(V2_REPOSITORY_INDEX_REQUEST, False)
    )
    async def repository_index(request: Request) -> Response:
        body = await request.body()
        options = json_object(body, limits) if body.strip() else {}
        ready = bool(options.get("ready", False))
        entries = await dataplane.repository_index(ready, visible=request_access.get().sees)
        return json_response(
            [
                {
                    "name": e.name,
                    "version": e.version,
                    "state": e.state,
                    **({"reason": e.reason} if e.reason else {}),
                }
                for e in entries
            ]
        )

    @route(
        "POST",
        "/v2/repository/models/{model_name}/load",
        versioned=False,
        body=request_body(V2_REPOSITORY_LOAD_REQUEST, False),
    )
    async def repository_load(model_name: str, request: Request) -> Response:
        body = await request.body()
        options = json_object(body, limits) if body.strip() else {}
        parameters = options.get("parameters", {})
        if not isinstance(parameters, dict):
            raise MalformedRequest(f"failed to load '{model_name}', 'parameters' must be a JSON object")
        await dataplane.load_model(model_name, load_parameters(model_name, parameters))
        return json_response({})

    @route("POST", "/v2/repository/models/{model_name}/unload", versioned=False)
    async def repository_unload(model_name: str) -> Response:
        await dataplane.unload_model(model_name)
        return json_response({})

    return router


async def infer(
    dataplane: DataPlane,
    contexts: ContextBuilder,
    body: bytes | bytearray,
    headers: Mapping[str, str],
    model_name: str,
    model_version: str | None,
    limits: InputLimits = DEFAULT_LIMITS,
    regions: SharedMemoryRegions = NO_SHARED_MEMORY,
) -> Answer:
    """POST /v2/models/{name}[/versions/{version}]/infer: decode, run, encode; the answer says
    where its time went in a Server-Timing header."""
    started = time.perf_counter_ns()
    try:
        header_length = headers.get(HEADER_LENGTH)
        body = decompress(body, headers.get("content-encoding"), limits, binary=header_length is not None)
        infer_request = decode_infer_request(body, header_length, model_name, model_version, limits, regions)
        context = contexts.build("rest", headers, infer_request.parameters, body_id=infer_request.id)
    except GatewayError as exc:
        exc.request_id = request_id(headers.get(REQUEST_ID_HEADER))
        raise
    decoded = time.perf_counter_ns()
    response = await dataplane.infer(infer_request, context)
    encoding = time.perf_counter_ns()
    answer = encode_infer_response(response, infer_request, context.request_id, regions)
    timing = response.timing
    if timing is not None:
        timing.transport(started, decoded, encoding, time.perf_counter_ns())
        answer.add_header(SERVER_TIMING, timing.header())
    return answer


def _tensor_metadata(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype.value, "shape": list(spec.shape)}


def _duration(d: Duration) -> dict[str, int]:
    return {"count": d.count, "ns": d.ns}


def _statistics(rows: list[ModelStatistics]) -> dict[str, Any]:
    return {
        "model_stats": [
            {
                "name": row.name,
                "version": row.version,
                "last_inference": row.stats.last_inference_ms,
                "inference_count": row.stats.inference_count,
                "execution_count": row.stats.execution_count,
                "inference_stats": {
                    "success": _duration(row.stats.success),
                    "fail": _duration(row.stats.fail),
                    "queue": _duration(row.stats.queue),
                    "compute_input": _duration(row.stats.compute_input),
                    "compute_infer": _duration(row.stats.compute_infer),
                    "compute_output": _duration(row.stats.compute_output),
                    "cache_hit": _duration(row.stats.cache_hit),
                    "cache_miss": _duration(row.stats.cache_miss),
                },
                "batch_stats": [],
            }
            for row in rows
        ]
    }
