"""Shared fixtures: a real gateway process on free loopback ports, and the clients users use.

The harness behind them (gateway processes, client wrappers, TorchServe helpers) is in tests/support/.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.support import FUZZ_CASES, LIMITED_ENV, Protocol, RunningGateway, TfServingProtocol, start_gateway
from tests.support.model_builders import build_test_repository


@pytest.fixture(scope="session")
def test_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("model_repo")
    build_test_repository(repo)
    return repo


@pytest.fixture(scope="session")
def gateway(test_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    # The tests load and unload models through the repository API, which is off by default.
    running = start_gateway(
        test_repo, tmp_path_factory.mktemp("logs") / "gateway.log", "--enable-repository-api"
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def small_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three ONNX models, quick to load, for tests that start gateways of their own settings:
    affine (FP32 [-1, 4] -> [-1, 3]), identity_fp32 and identity_bytes (INPUT -> OUTPUT)."""
    from gateway.types import Datatype
    from scripts.build_models import _save, build_affine
    from tests.support.model_builders import build_identity

    repo = tmp_path_factory.mktemp("small_repo")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    for datatype in (Datatype.FP32, Datatype.BYTES):
        _save(build_identity(datatype), repo / f"identity_{datatype.value.lower()}" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="session")
def limited_gateway(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway over small_repo with LIMITED_ENV's limits and the repository API on."""
    log = tmp_path_factory.mktemp("limited") / "gateway.log"
    running = start_gateway(small_repo, log, "--enable-repository-api", env=LIMITED_ENV)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FUZZ_CASES:
        terminalreporter.section("fuzz cases run")
        for name, count in sorted(FUZZ_CASES.items()):
            terminalreporter.write_line(f"{name}: {count}")
        terminalreporter.write_line(f"total: {sum(FUZZ_CASES.values())}")


@pytest.fixture
def http(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


@pytest.fixture(params=["rest", "grpc"])
def protocol(request: pytest.FixtureRequest, gateway: RunningGateway) -> Iterator[Protocol]:
    if request.param == "rest":
        client = triton_http.InferenceServerClient(gateway.http, network_timeout=60)
        yield Protocol("rest", triton_http, client)
    else:
        client = triton_grpc.InferenceServerClient(gateway.grpc)
        yield Protocol("grpc", triton_grpc, client)
    client.close()


@pytest.fixture(params=["rest", "grpc"])
def tf_protocol(request: pytest.FixtureRequest, gateway: RunningGateway) -> Iterator[TfServingProtocol]:
    """TF Serving's API on the session gateway, over REST and over gRPC."""
    import grpc

    with (
        httpx.Client(base_url=gateway.url, timeout=60) as client,
        grpc.insecure_channel(gateway.grpc) as channel,
    ):
        yield TfServingProtocol(request.param, client, channel)


@pytest.fixture(scope="session")
def tfserving_gateway(
    gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    """A second gateway whose models are `backend: tfserving`, served by the session gateway's TF Serving
    front door (itself over in-process TensorFlow and ONNX Runtime): both ends speak the official protos."""
    from tests.support.model_builders import build_tfserving_repository

    repo = tmp_path_factory.mktemp("tfserving_repo")
    build_tfserving_repository(repo, grpc_address=gateway.grpc, rest_url=gateway.url)
    running = start_gateway(repo, tmp_path_factory.mktemp("logs") / "tfserving_gateway.log")
    yield running
    running.stop()
