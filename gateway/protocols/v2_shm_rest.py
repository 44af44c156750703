"""Triton's shared-memory extension over REST: `/v2/systemsharedmemory/...` and
`/v2/cudasharedmemory/...` (status, register, unregister), over the one set of regions
(gateway/protocols/shared_memory.py) that the gRPC methods share."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from gateway.codec import DEFAULT_LIMITS, InputLimits
from gateway.errors import MalformedRequest, Unsupported
from gateway.protocols.shared_memory import CUDA_REFUSED, RegionStatus, SharedMemoryRegions, no_cuda_region
from gateway.protocols.v2_json import json_object
from gateway.protocols.v2_rest_codec import json_response
from gateway.types import quoted

SYSTEM = "/v2/systemsharedmemory"
CUDA = "/v2/cudasharedmemory"
# The path templates of the routes that change or read regions, for the access check.
TEMPLATES = tuple(
    f"{root}{where}/{verb}"
    for root in (SYSTEM, CUDA)
    for where in ("", "/region/{name}")
    for verb in ("status", "register", "unregister")
    if not (where == "" and verb == "register")
)


def _status(region: RegionStatus) -> dict[str, Any]:
    return {"name": region.name, "key": region.key, "offset": region.offset, "byte_size": region.byte_size}


def _integer(body: dict[str, Any], key: str, default: int | None = None) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise MalformedRequest(f"a shared memory registration needs '{key}', an integer")
    return value


def shared_memory_router(regions: SharedMemoryRegions, limits: InputLimits = DEFAULT_LIMITS) -> APIRouter:
    router = APIRouter()

    @router.get(f"{SYSTEM}/status")
    @router.get(f"{SYSTEM}/region/{{name}}/status")
    async def system_status(name: str | None = None) -> Response:
        return json_response([_status(region) for region in regions.status(name)])

    @router.post(f"{SYSTEM}/region/{{name}}/register")
    async def system_register(name: str, request: Request) -> Response:
        body = json_object(await request.body(), limits)
        key = body.get("key")
        if not isinstance(key, str):
            raise MalformedRequest("a shared memory registration needs 'key', a string")
        regions.register(name, key, _integer(body, "offset", 0), _integer(body, "byte_size"))
        return json_response({})

    @router.post(f"{SYSTEM}/unregister")
    @router.post(f"{SYSTEM}/region/{{name}}/unregister")
    async def system_unregister(name: str | None = None) -> Response:
        regions.unregister(name)
        return json_response({})

    @router.get(f"{CUDA}/status")
    @router.get(f"{CUDA}/region/{{name}}/status")
    async def cuda_status(name: str | None = None) -> Response:
        # No CUDA region can be registered here: there are none to list, and none by any name.
        if name:
            raise no_cuda_region(name)
        return json_response([])

    @router.post(f"{CUDA}/region/{{name}}/register")
    async def cuda_register(name: str) -> Response:
        raise Unsupported(f"cannot register CUDA shared memory region {quoted(name)}: {CUDA_REFUSED}")

    @router.post(f"{CUDA}/unregister")
    @router.post(f"{CUDA}/region/{{name}}/unregister")
    async def cuda_unregister(name: str | None = None) -> Response:
        return json_response({})

    return router
