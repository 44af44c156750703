"""Every row of the error table, raised by a backend, reaches REST and gRPC clients as the table says.

The backend here is the real ONNX Runtime adapter made to raise one error class per model, so that
rows no real fault can reach on this machine yet (a remote backend being down) are covered too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from adapters.base import LoadSpec, ModelAdapter
from adapters.onnxruntime import OnnxRuntimeAdapter
from gateway.errors import (
    ERROR_TABLE,
    GatewayError,
    MethodNotAllowed,
    ModelNotReady,
    NoSuchEndpoint,
    Overloaded,
    remote_grpc_error,
    remote_http_error,
    status_for,
)
from gateway.types import Datatype
from scripts.build_models import _save
from tests.support import InProcessGateway
from tests.support.model_builders import build_identity

ROWS = list(ERROR_TABLE.items())


def model_name(error: type[GatewayError]) -> str:
    return f"raises_{error.__name__.lower()}"


class RaisingAdapter(OnnxRuntimeAdapter):
    """Loads and describes the model for real, then fails every request with one gateway error."""

    error: type[GatewayError]

    async def infer(
        self, inputs: Mapping[str, Any], output_names: Sequence[str], *, deadline: float | None = None
    ) -> dict[str, Any]:
        raise self.error(f"{self.spec.label}: {self.error.__name__} raised by the backend")


def raising_factory(backend: str, spec: LoadSpec) -> ModelAdapter:
    adapter = RaisingAdapter(spec)
    adapter.error = next(error for error, _ in ROWS if model_name(error) == spec.model_name)
    return adapter


@pytest.fixture(scope="module")
def table_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcessGateway]:
    repo: Path = tmp_path_factory.mktemp("table_repo")
    for error, _ in ROWS:
        _save(build_identity(Datatype.FP32), repo / model_name(error) / "1" / "model.onnx")
    with InProcessGateway(repo, raising_factory) as running:
        yield running


BODY = {"inputs": [{"name": "INPUT", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}]}


@pytest.mark.parametrize(("error", "expected"), ROWS, ids=[error.__name__ for error, _ in ROWS])
def test_rest_status_follows_the_table(
    table_gateway: InProcessGateway, error: type[GatewayError], expected: Any
) -> None:
    status, _ = expected
    response = httpx.post(f"http://{table_gateway.http}/v2/models/{model_name(error)}/infer", json=BODY)
    assert response.status_code == status
    assert response.json() == {
        "error": f"model '{model_name(error)}' version 1: {error.__name__} raised by the backend"
    }
    assert ("Retry-After" in response.headers) == issubclass(error, Overloaded)


@pytest.mark.parametrize(("error", "expected"), ROWS, ids=[error.__name__ for error, _ in ROWS])
def test_grpc_code_follows_the_table(
    table_gateway: InProcessGateway, error: type[GatewayError], expected: Any
) -> None:
    _, code = expected
    client = triton_grpc.InferenceServerClient(table_gateway.grpc)
    tensor = triton_grpc.InferInput("INPUT", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model_name(error), [tensor])
    client.close()
    assert caught.value.status() == str(code)
    assert f"{error.__name__} raised by the backend" in caught.value.message()


def test_grpc_overload_carries_retry_after(table_gateway: InProcessGateway) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name=model_name(Overloaded))
    request.inputs.add(name="INPUT", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    with grpc.insecure_channel(table_gateway.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "1") in tuple(caught.value.trailing_metadata())


# What a client of the gateway hears when a remote backend (TF Serving, TorchServe, a v2 server)
# answers with a status: the remote's own code, except where the gateway reads it otherwise.
REMOTE_HTTP_HEARD = {
    400: 400, 422: 400, 413: 413, 429: 429, 501: 501, 503: 503, 504: 504,
    # The remote lacks its copy of a model this gateway has: not ready here, so a fallback may
    # answer and the client may retry. 404 stays for what the gateway itself does not have.
    404: 503,
    # A proxy in front of the remote failing, or a worker out of memory: the backend is down.
    502: 503, 507: 503,
    # The gateway's own credentials refused, or the remote failing: the gateway's fault, not the client's.
    401: 500, 403: 500, 500: 500,
}  # fmt: skip
REMOTE_GRPC_HEARD = {
    grpc.StatusCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED: grpc.StatusCode.INTERNAL,
    grpc.StatusCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


def test_a_remote_backend_s_status_reads_back_through_one_table() -> None:
    """Every remote adapter reads a remote's status with `remote_http_error`/`remote_grpc_error`."""
    for status, heard in REMOTE_HTTP_HEARD.items():
        assert status_for(remote_http_error(status)("remote"))[0] == heard, status
    for code, heard_code in REMOTE_GRPC_HEARD.items():
        assert status_for(remote_grpc_error(code)("remote"))[1] == heard_code, code
    assert remote_http_error(404) is remote_grpc_error(grpc.StatusCode.NOT_FOUND) is ModelNotReady


def test_starlette_refusals_go_through_the_table(table_gateway: InProcessGateway) -> None:
    """No route, or a route asked with the wrong method: answered from the table, in its body shape."""
    unknown = httpx.get(f"http://{table_gateway.http}/v3/nothing/here", timeout=10)
    assert unknown.status_code == status_for(NoSuchEndpoint("x"))[0] == 404
    assert unknown.json() == {"error": "GET /v3/nothing/here: no such endpoint"}
    wrong = httpx.delete(f"http://{table_gateway.http}/v2/health/live", timeout=10)
    assert wrong.status_code == status_for(MethodNotAllowed("x"))[0] == 405
    assert "DELETE /v2/health/live" in wrong.json()["error"]


def test_tool_errors_are_kept_off_the_serving_table() -> None:
    """A tool's failure is an exit status, not a request's answer: it has its own base class."""
    from gateway.tools.containers import UpError
    from gateway.tools.convert import ConvertError
    from gateway.tools.errors import ToolError
    from gateway.tools.lab.bench import BenchError
    from gateway.tools.lab.report import ReportError
    from gateway.tools.parity import ParityMismatch, ParityUsageError

    for error in (BenchError, ReportError, ConvertError, ParityUsageError, ParityMismatch, UpError):
        assert issubclass(error, ToolError) and not issubclass(error, GatewayError), error


def test_an_error_for_a_call_that_already_ended_ends_quietly() -> None:
    """The client's deadline passes just as the gateway's own DeadlineExceeded is raised: grpc core
    has closed the call, and sending the status fails inside grpc (ExecuteBatchError). That race
    cannot be timed from a test, so the call's context here is a stand-in whose abort fails the way
    grpc's does; the handler must end as a cancelled call, not raise grpc's error into its log."""
    import asyncio

    from grpc._cython import cygrpc

    from gateway.errors import DeadlineExceeded
    from gateway.protocols.v2_grpc import ErrorInterceptor

    class EndedCall:
        trailers: tuple[tuple[str, str], ...] = ()

        def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
            self.trailers = trailers

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise cygrpc.ExecuteBatchError('Failed "execute_batch"')

    async def late(request: Any, context: Any) -> Any:
        raise DeadlineExceeded("model 'spin' version 1: no answer before the deadline")

    handler = grpc.unary_unary_rpc_method_handler(late)
    guarded = ErrorInterceptor().wrap("/inference.GRPCInferenceService/ModelInfer", handler)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(guarded.unary_unary(object(), EndedCall()))
