"""The gRPC infer path's Python pieces, timed one by one in-process: µs per call, best of several
repeats (the least disturbed by other work on a shared machine).

    python benchmarks/profiles/hot_path_micro.py [--repeat 7] [--number 20000]

The pieces are the gateway's own functions, called on mlp's batch-1 request as the bench sends
it: the metadata dict, decode, the request context, the data plane (with onnxruntime, and with a backend that answers
at once), the metric `.labels()` lookups a request makes, the error guard's per-call work,
and encode. Run from the repository root; it imports the checkout's gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tritonclient.grpc import service_pb2  # noqa: E402

from gateway.protocols.v2_grpc import (  # noqa: E402
    ErrorInterceptor,
    decode_infer_request,
    encode_infer_response,
)
from gateway.server import Gateway  # noqa: E402
from gateway.settings import Settings  # noqa: E402
from gateway.types import InferRequest  # noqa: E402

# What tritonclient's gRPC client sends as metadata on an infer call, as the servicer sees it.
METADATA = (("user-agent", "grpc-python/1.85.3 grpc-c/52.0.0 (linux; chttp2)"),)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    return parser.parse_args()


def best_us(fn: Callable[[], object], args: argparse.Namespace, number: int | None = None) -> float:
    n = number or args.number
    return min(timeit.repeat(fn, number=n, repeat=args.repeat)) / n * 1e6


def async_best_us(
    loop: asyncio.AbstractEventLoop,
    make: Callable[[], Any],
    args: argparse.Namespace,
    number: int,
    setup: Callable[[], None] = lambda: None,
) -> float:
    """µs per awaited call of `make()`, looped inside one task (no task creation counted);
    `setup` runs before each repeat."""

    async def run() -> float:
        setup()
        started = time.perf_counter()
        for _ in range(number):
            await make()
        return time.perf_counter() - started

    return min(loop.run_until_complete(run()) for _ in range(args.repeat)) / number * 1e6


def mlp_request() -> Any:
    x = np.random.default_rng(20240601).standard_normal((1, 64)).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="mlp")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(x.tobytes())
    return request


class FixedAdapter:
    """Stands in for a loaded adapter's `infer`: the answer at once, to time the data plane alone."""

    def __init__(self, answer: dict[str, np.ndarray[Any, Any]]) -> None:
        self.answer = answer

    async def ready(self) -> bool:
        return True

    async def infer(
        self, inputs: Mapping[str, Any], output_names: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, np.ndarray[Any, Any]]:
        return self.answer


def main() -> None:
    args = parse_args()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    repo = Path(tempfile.mkdtemp(prefix="modelyard-micro-"))
    shutil.copytree(ROOT / "model_repo" / "mlp", repo / "mlp")
    gateway = Gateway(Settings(model_repo=repo, log_level="warning"))
    loop.run_until_complete(gateway.dataplane.load_all())
    gateway.dataplane.mark_started()
    dataplane, limits = gateway.dataplane, gateway.limits
    request = mlp_request()
    results: list[tuple[str, float]] = []

    results.append(
        (
            "metadata dict from invocation_metadata (ModelInfer's first line)",
            best_us(lambda: {k: v for k, v in METADATA if isinstance(v, str)}, args),
        )
    )
    results.append(("decode_infer_request", best_us(lambda: decode_infer_request(request, limits), args)))

    def fresh() -> InferRequest:
        return decode_infer_request(request, limits)

    contexts = gateway.contexts
    metadata = dict(METADATA)
    results.append(
        (
            "the request context (ContextBuilder.build)",
            best_us(lambda: contexts.build("grpc", metadata, {}, transport_deadline=None), args),
        )
    )

    def infer() -> Any:
        return dataplane.infer(fresh(), contexts.build("grpc", metadata, {}, transport_deadline=None))

    decode_us = best_us(lambda: (fresh(), contexts.build("grpc", metadata, {})), args)
    number = args.number // 4
    loaded = dataplane.registry.get("mlp").versions[1]
    adapter: Any = loaded.adapter

    default_bound = adapter._inline_below

    def inline_on() -> None:
        # On a shared machine a preempted run trips the adapter's 10x guard (it reads wall time)
        # and turns inlining off for good; a bound out of reach keeps every run inline here.
        adapter._inline_below = 10**9
        adapter._inline, adapter._element_us = True, 0.0

    def through_pool() -> None:
        adapter._inline_below = default_bound
        adapter._inline = False

    for label, setup in (("inline", inline_on), ("thread pool", through_pool)):
        setup()
        total = async_best_us(loop, infer, args, number, setup) - decode_us
        results.append((f"DataPlane.infer, onnxruntime {label} (decode and context subtracted)", total))
    x = fresh().inputs[0].data
    for label, setup in (("inline", inline_on), ("thread pool", through_pool)):
        setup()
        results.append(
            (
                f"OnnxRuntimeAdapter.infer alone, {label}",
                async_best_us(loop, lambda: adapter.infer({"input": x}, ["logits"]), args, number, setup),
            )
        )
    session = adapter._session
    results.append(
        ("onnxruntime Session.run alone", best_us(lambda: session.run(["logits"], {"input": x}), args))
    )
    inline_on()
    answer = loop.run_until_complete(adapter.infer({"input": x}, ["logits"]))
    loaded.adapter = FixedAdapter(answer)  # type: ignore[assignment]
    fixed = async_best_us(loop, infer, args, number) - decode_us
    results.append(("DataPlane.infer, backend answering at once (decode and context subtracted)", fixed))
    loaded.adapter = adapter

    metrics = gateway.metrics
    labels = ("mlp", "1", "onnxruntime", "grpc")

    # A request's metric children come cached per (model, version, backend, protocol).
    results.append(
        (
            "the version's cached metric series (Metrics.series)",
            best_us(lambda: metrics.series(*labels), args),
        )
    )
    series = metrics.series(*labels)

    def in_loop_us(fn: Callable[[], object]) -> float:
        """µs per call of `fn` inside the running event loop, where the series hold observations."""

        async def run() -> float:
            started = time.perf_counter()
            for _ in range(args.number):
                fn()
            return time.perf_counter() - started

        return min(loop.run_until_complete(run()) for _ in range(args.repeat)) / args.number * 1e6

    results.append(("one cached counter child's inc() (held)", in_loop_us(series.count_child("200").inc)))
    results.append(
        ("one cached histogram child's observe() (held)", in_loop_us(lambda: series.duration.observe(0.0005)))
    )
    metrics.flush()

    response = loop.run_until_complete(infer())
    results.append(("encode_infer_response", best_us(lambda: encode_infer_response(response), args)))
    encoded = encode_infer_response(response)
    results.append(("ModelInferResponse.SerializeToString", best_us(encoded.SerializeToString, args)))

    async def answer(request: Any, context: Any) -> None:
        return None

    handler = grpc.unary_unary_rpc_method_handler(
        answer,
        request_deserializer=service_pb2.ModelInferRequest.FromString,
        response_serializer=service_pb2.ModelInferResponse.SerializeToString,
    )
    guarded = ErrorInterceptor(None).wrap("/inference.GRPCInferenceService/ModelInfer", handler).unary_unary
    results.append(
        (
            "the error guard around a unary handler, per call (ErrorInterceptor.wrap's)",
            async_best_us(loop, lambda: guarded(request, None), args, number)
            - async_best_us(loop, lambda: answer(request, None), args, number),
        )
    )
    loop.run_until_complete(gateway.registry.aclose())
    loop.close()
    shutil.rmtree(repo)
    width = max(len(name) for name, _ in results)
    print(f"{'piece':<{width}}  µs per call (best of {args.repeat})")
    for name, us in results:
        print(f"{name:<{width}}  {us:8.2f}")


if __name__ == "__main__":
    main()
