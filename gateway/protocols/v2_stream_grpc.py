"""Triton's streaming inference, `ModelStreamInfer`: one bidirectional gRPC stream that serves
every model.

Each request on the stream gets exactly one response, which carries the request's v2 `id` so the
client can match them: answers may come back in another order than their requests, since the
requests run concurrently, up to a bound per stream. A request that fails gets a response too,
with `error_message` set and its id in `infer_response`, and the stream goes on; only the client
ending the stream (or its deadline) ends it.

Each request is decoded and run exactly as a unary ModelInfer is: the same decoder, the one
request-context builder (from the stream's metadata and deadline, and the request's own
parameters) and the one data plane. The access check runs per request, since each names its model.

A stream has no trailing metadata per answer: where the stream asks for timing (the unary call's
`x-server-timing` metadata, on the stream, or the gateway's setting), each answer carries its
Server-Timing value in its `server_timing` parameter instead. Every answered request's phases go
into the phase histogram, asked for or not, as a unary call's do.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from tritonclient.grpc import service_pb2

from gateway.auth import Authorizer, request_access
from gateway.context import REQUEST_ID_HEADER, ContextBuilder, deadline_after
from gateway.dataplane import DataPlane
from gateway.errors import GatewayError, public_message
from gateway.timing import timing_asked
from gateway.types import InferRequest, InferResponse

log = logging.getLogger("modelyard.grpc")

# Requests of one stream that run at once, answers not yet written included; past it the stream
# reads no further request until one is written, so a client that does not read cannot make the
# gateway hold more.
DEFAULT_STREAM_CONCURRENCY = 64
# The answer's parameter that holds its Server-Timing value. Neither Triton nor KServe has one;
# Triton keeps the `triton_` prefix for its own parameters, so the name is modelyard's.
TIMING_PARAMETER = "server_timing"

# Decodes one request (the unary path's decoder) and runs it through the data plane.
Decode = Callable[[Any], InferRequest]
Encode = Callable[[InferResponse], Any]


class StreamInfer:
    """The stream handler of one servicer: reads requests, runs each in its own task, and yields
    one ModelStreamInferResponse per request as each is ready."""

    def __init__(
        self,
        dataplane: DataPlane,
        contexts: ContextBuilder,
        decode: Decode,
        encode: Encode,
        *,
        authorizer: Authorizer | None = None,
        concurrency: int = DEFAULT_STREAM_CONCURRENCY,
        server_timing: bool = False,
    ) -> None:
        self.dataplane = dataplane
        self.contexts = contexts
        self.decode = decode
        self.encode = encode
        self.authorizer = authorizer if authorizer is not None and authorizer.enabled else None
        self.concurrency = concurrency
        # Timing in every answer's parameters; else only on streams whose metadata asks for it.
        self.server_timing = server_timing

    async def __call__(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        metadata = ContextBuilder.grpc_metadata(context.invocation_metadata())
        credentials = metadata.get("authorization") or metadata.get("x-api-key")
        # The stream's X-Request-ID would name every request on it: each goes by its own v2 id.
        metadata.pop(REQUEST_ID_HEADER, None)
        timed = timing_asked(metadata, self.server_timing)
        slots = asyncio.Semaphore(self.concurrency)
        answers: asyncio.Queue[Any] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        done = object()

        async def one(request: Any) -> None:
            answers.put_nowait(await self._answer(request, metadata, credentials, context, timed))

        async def read() -> None:
            try:
                async for request in requests:
                    await slots.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running:
                    await asyncio.gather(*running, return_exceptions=True)
            finally:
                answers.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while True:
                answer = await answers.get()
                if answer is done:
                    break
                yield answer
                slots.release()
            # The reader's own failure (the client's stream broke) ends the call with it.
            reader.result()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()

    async def _answer(
        self,
        request: Any,
        metadata: dict[str, str],
        credentials: str | None,
        context: grpc.aio.ServicerContext,
        timed: bool,
    ) -> Any:
        try:
            if self.authorizer is not None:
                request_access.set(self.authorizer.check(credentials, "infer", request.model_name or None))
            started = time.perf_counter_ns()
            infer_request = self.decode(request)
            request_context = self.contexts.build(
                "grpc",
                metadata,
                infer_request.parameters,
                transport_deadline=deadline_after(context.time_remaining()),
                body_id=infer_request.id,
            )
            decoded = time.perf_counter_ns()
            response = await self.dataplane.infer(infer_request, request_context)
            encoding = time.perf_counter_ns()
            encoded = self.encode(response)
            timing = response.timing
            if timing is not None:
                timing.transport(started, decoded, encoding, time.perf_counter_ns())
                if timed:
                    encoded.parameters[TIMING_PARAMETER].string_param = timing.header()
            return service_pb2.ModelStreamInferResponse(infer_response=encoded)
        except GatewayError as exc:
            message = public_message(exc)
        except Exception as exc:
            log.exception("unexpected error in a ModelStreamInfer request")
            message = f"internal error: {type(exc).__name__}"
        # As Triton does: the error in the response, and the request's id beside it so the client
        # knows which request it answers.
        return service_pb2.ModelStreamInferResponse(
            error_message=message,
            infer_response=service_pb2.ModelInferResponse(
                id=request.id, model_name=request.model_name, model_version=request.model_version
            ),
        )
