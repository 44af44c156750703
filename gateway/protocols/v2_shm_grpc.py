"""Triton's shared-memory extension over gRPC: the `SystemSharedMemory*` and `CudaSharedMemory*`
methods of `inference.GRPCInferenceService`, over the one set of regions
(gateway/protocols/shared_memory.py) that the REST endpoints share. A mixin of the v2 servicer."""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2

from gateway.errors import Unsupported
from gateway.protocols.shared_memory import CUDA_REFUSED, SharedMemoryRegions, no_cuda_region
from gateway.types import quoted


class SharedMemoryServicer:
    """The shared-memory methods; the servicer that mixes it in sets `regions`."""

    regions: SharedMemoryRegions

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        answer = service_pb2.SystemSharedMemoryStatusResponse()
        for region in self.regions.status(request.name or None):
            answer.regions[region.name].CopyFrom(
                service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
                    name=region.name, key=region.key, offset=region.offset, byte_size=region.byte_size
                )
            )
        return answer

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        self.regions.register(request.name, request.key, request.offset, request.byte_size)
        return service_pb2.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        self.regions.unregister(request.name or None)
        return service_pb2.SystemSharedMemoryUnregisterResponse()

    async def CudaSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        # No CUDA region can be registered here: there are none to list, and none by any name.
        if request.name:
            raise no_cuda_region(request.name)
        return service_pb2.CudaSharedMemoryStatusResponse()

    async def CudaSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        raise Unsupported(f"cannot register CUDA shared memory region {quoted(request.name)}: {CUDA_REFUSED}")

    async def CudaSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        return service_pb2.CudaSharedMemoryUnregisterResponse()
