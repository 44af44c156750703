"""The tests' harness: real gateways, the clients users use, TorchServe helpers. Fixtures built on
it live in the root conftest.py."""

from gateway.net import free_port
from tests.support.clients import (
    Protocol,
    TfServingError,
    TfServingProtocol,
    float_tensor_proto,
)
from tests.support.gateways import (
    LIMITED_ENV,
    ROOT,
    STARTUP_TIMEOUT_S,
    InProcessGateway,
    RunningGateway,
    grpc_server,
    start_gateway,
)
from tests.support.torchserve import StandaloneTorchServe, archive_for_torchserve, torchserve_missing

# How many generated cases each fuzz test ran, printed at the end of the run.
FUZZ_CASES: dict[str, int] = {}

__all__ = [
    "FUZZ_CASES",
    "LIMITED_ENV",
    "ROOT",
    "STARTUP_TIMEOUT_S",
    "InProcessGateway",
    "Protocol",
    "RunningGateway",
    "StandaloneTorchServe",
    "TfServingError",
    "TfServingProtocol",
    "archive_for_torchserve",
    "float_tensor_proto",
    "free_port",
    "grpc_server",
    "start_gateway",
    "torchserve_missing",
]
