"""The v2 backend (`backend: v2`) against real Open Inference Protocol servers.

The remotes are a second modelyard (the session gateway, over gRPC and over REST) and KServe's
Python model server, run as a real subprocess in its own pinned venv (benchmarks/peer_venvs.py).
First the adapter in-process, then a third gateway whose models are all `backend: v2`, called with
tritonclient over REST and gRPC and with TF Serving's API.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from adapters import SharedResources
from adapters.base import LoadSpec
from adapters.v2 import V2Adapter
from benchmarks import peer_venvs
from gateway.config import ModelConfig, TensorDecl
from gateway.errors import BackendUnavailable, DeadlineExceeded, InvalidInput, ModelNotReady
from gateway.types import Datatype, TensorSpec
from tests.support import ROOT, RunningGateway, TfServingProtocol, free_port, start_gateway

X = np.random.default_rng(20261125).standard_normal((3, 4)).astype(np.float32)
PROTOCOLS = ["grpc", "rest"]


def affine_reference(test_repo: Path, version: int, x: np.ndarray = X) -> np.ndarray:
    session = ort.InferenceSession(str(test_repo / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


def address(remote: RunningGateway, protocol: str) -> str:
    return remote.grpc if protocol == "grpc" else remote.url


def spec_for(
    address: str, protocol: str, model_name: str, local_version: int = 1, shared: SharedResources | None = None,
    config: dict[str, Any] | None = None, **options: Any,
) -> LoadSpec:  # fmt: skip
    section = {"address": address, "protocol": protocol, "model_name": model_name, **options}
    model_config = ModelConfig(backend="v2", v2=section, **(config or {}))
    return LoadSpec(
        "local", local_version, Path("/nonexistent"), None, model_config, shared=shared or SharedResources()
    )


# The adapter against a second modelyard ---------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("version", [1, 2])
async def test_infer_and_metadata_come_from_the_remote(
    gateway: RunningGateway, test_repo: Path, protocol: str, version: int
) -> None:
    shared = SharedResources()
    spec = spec_for(
        address(gateway, protocol), protocol, "affine", version, shared, versions={version: str(version)}
    )
    async with V2Adapter(spec) as adapter:
        assert await adapter.ready()
        signature = await adapter.metadata()
        assert signature.inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        assert signature.outputs == (TensorSpec("y", Datatype.FP32, (-1, 3)),)
        assert signature.platform == "onnxruntime_onnx"
        result = await adapter.infer({"x": X}, ["y"])
    await shared.aclose()
    assert result["y"].dtype == np.float32
    np.testing.assert_allclose(result["y"], affine_reference(test_repo, version), rtol=1e-6, atol=1e-6)
    assert not await adapter.ready()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_versions_of_one_address_share_one_channel(gateway: RunningGateway, protocol: str) -> None:
    shared = SharedResources()
    specs = [
        spec_for(address(gateway, protocol), protocol, "affine", v, shared, version=str(v)) for v in (1, 2)
    ]
    async with V2Adapter(specs[0]) as first, V2Adapter(specs[1]) as second:
        assert (first._channel or first._http) is (second._channel or second._http)
        one, two = await asyncio.gather(first.infer({"x": X}, ["y"]), second.infer({"x": X}, ["y"]))
        assert not np.allclose(one["y"], two["y"])  # two versions, two answers, one connection
    await shared.aclose()


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_strings_cross_as_raw_bytes(gateway: RunningGateway, test_repo: Path, protocol: str) -> None:
    texts = [b"The Cat", b"of", "caf\u00e9 OF".encode()]
    shared = SharedResources()
    async with V2Adapter(
        spec_for(address(gateway, protocol), protocol, "text_normalizer", shared=shared)
    ) as adapter:
        result = await adapter.infer({"text": np.array(texts, dtype=object)}, ["normalized"])
    await shared.aclose()
    session = ort.InferenceSession(str(test_repo / "text_normalizer" / "1" / "model.onnx"))
    (expected,) = session.run(None, {"text": np.array([t.decode() for t in texts], dtype=object)})
    assert list(result["normalized"]) == [str(v).encode() for v in expected]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_remote_errors_map_into_the_gateway_table(gateway: RunningGateway, protocol: str) -> None:
    shared = SharedResources()
    where = address(gateway, protocol)
    # What the remote does not have is this deployment not being ready: 404 stays for what the
    # gateway itself does not have (gateway/errors.py, REMOTE_HTTP_ERRORS).
    with pytest.raises(ModelNotReady, match="remote model 'no_such_model'"):
        await V2Adapter(spec_for(where, protocol, "no_such_model", shared=shared)).load()
    async with V2Adapter(spec_for(where, protocol, "affine", shared=shared, version="1")) as adapter:
        with pytest.raises(InvalidInput, match="affine"):
            await adapter.infer({"x": np.zeros((2, 5), np.float32)}, ["y"])
        with pytest.raises(ModelNotReady, match="version 9"):
            await _infer_version(adapter, "9")
    await shared.aclose()


async def _infer_version(adapter: V2Adapter, version: str) -> None:
    adapter.remote_version = version
    await adapter.infer({"x": X}, ["y"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_an_unreachable_remote_is_backend_unavailable(protocol: str) -> None:
    where = f"127.0.0.1:{free_port()}" if protocol == "grpc" else f"http://127.0.0.1:{free_port()}"
    shared = SharedResources()
    with pytest.raises(BackendUnavailable) as caught:
        await V2Adapter(spec_for(where, protocol, "affine", shared=shared, timeout_s=5)).load()
    await shared.aclose()
    # A client reads the model and the cause; where the remote is, only the server's log.
    port = where.rsplit(":", 1)[1]
    assert "affine" in caught.value.message and port not in caught.value.message
    assert port in caught.value.logged


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_the_deadline_is_the_remote_call_s(gateway: RunningGateway, protocol: str) -> None:
    """`spin` has no limits on the remote; an n=3000 product takes far longer than 50 ms on any CPU,
    so only the propagated deadline stops the call (the adapter's own timeout is 30 s)."""
    shared = SharedResources()
    async with V2Adapter(spec_for(address(gateway, protocol), protocol, "spin", shared=shared)) as adapter:
        with pytest.raises(DeadlineExceeded):
            await adapter.infer({"n": np.array([3000], np.int64)}, ["sum"], deadline=time.monotonic() + 0.05)
        with pytest.raises(DeadlineExceeded, match="passed before the call"):
            await adapter.infer({"n": np.array([1], np.int64)}, ["sum"], deadline=time.monotonic() - 1)
        small = await adapter.infer({"n": np.array([3], np.int64)}, ["sum"], deadline=time.monotonic() + 30)
    await shared.aclose()
    assert small["sum"].tolist() == [27.0]


async def test_a_bad_section_is_a_clear_load_error() -> None:
    with pytest.raises(ModelNotReady, match="protocol"):
        V2Adapter(spec_for("127.0.0.1:1", "websocket", "affine"))


# KServe's Python model server -------------------------------------------------------------------

# Building KServe's venv (kserve 0.21 and its dependencies) takes about 75 s with a warm pip cache on
# the 2-core VM; it is made once under benchmarks/peers/kserve and reused after that.
KSERVE_VENV_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kserve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """KServe serving model_repo/affine/1 (ONNX Runtime inside KServe) as `affine`, v2 REST."""
    if os.environ.get("MODELYARD_SKIP_KSERVE"):
        pytest.skip("MODELYARD_SKIP_KSERVE is set")
    try:
        venv = peer_venvs.ensure_venv("kserve", timeout_s=KSERVE_VENV_TIMEOUT_S)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"KServe's venv cannot be built here ({' '.join(peer_venvs.PEER_PINS['kserve'])}): {exc}")
    http_port = free_port()
    command = peer_venvs.kserve_command(
        venv, ROOT / "model_repo" / "affine" / "1" / "model.onnx", "affine", http_port, free_port()
    )
    log = tmp_path_factory.mktemp("kserve") / "kserve.log"
    url = f"http://127.0.0.1:{http_port}"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"KServe did not serve affine:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(f"{url}/v2/models/affine/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


KSERVE_DECLARED = {
    "inputs": (TensorDecl(name="x", datatype=Datatype.FP32, shape=(-1, 4)),),
    "outputs": (TensorDecl(name="y", datatype=Datatype.FP32, shape=(-1, 3)),),
}


async def test_kserve_as_the_remote(kserve: str, test_repo: Path) -> None:
    shared = SharedResources()
    # KServe's custom models list no tensors in their metadata, so config.yaml declares them.
    async with V2Adapter(
        spec_for(kserve, "rest", "affine", shared=shared, config=KSERVE_DECLARED)
    ) as adapter:
        assert await adapter.ready()
        assert (await adapter.metadata()).inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        result = await adapter.infer({"x": X}, ["y"])
        with pytest.raises(ModelNotReady):
            await V2Adapter(spec_for(kserve, "rest", "nope", shared=shared, config=KSERVE_DECLARED)).load()
    await shared.aclose()
    np.testing.assert_allclose(result["y"], affine_reference(test_repo, 1), rtol=1e-6, atol=1e-6)


# A gateway fronting another ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def v2_gateway(gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    from tests.support.model_builders import build_v2_repository

    repo = tmp_path_factory.mktemp("v2_repo")
    build_v2_repository(repo, grpc_address=gateway.grpc, rest_url=gateway.url)
    running = start_gateway(repo, tmp_path_factory.mktemp("logs") / "v2_gateway.log")
    yield running
    running.stop()


@pytest.fixture(params=["rest", "grpc"])
def client(request: pytest.FixtureRequest, v2_gateway: RunningGateway) -> Iterator[tuple[Any, Any]]:
    if request.param == "rest":
        rest = triton_http.InferenceServerClient(v2_gateway.http, network_timeout=60)
        yield rest, triton_http
        rest.close()
    else:
        grpc_client = triton_grpc.InferenceServerClient(v2_gateway.grpc)
        yield grpc_client, triton_grpc
        grpc_client.close()


def infer(
    client: Any, module: Any, model: str, x: np.ndarray, version: str = "", headers: Any = None
) -> np.ndarray:
    tensor = module.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor], model_version=version, headers=headers).as_numpy("y")


@pytest.mark.parametrize("remote_protocol", PROTOCOLS)
def test_rollout_labels_apply_to_remote_versions(
    client: tuple[Any, Any], test_repo: Path, remote_protocol: str
) -> None:
    triton, module = client
    model = f"v2_affine_{remote_protocol}"
    np.testing.assert_allclose(
        infer(triton, module, model, X), affine_reference(test_repo, 1), rtol=1e-6, atol=1e-6
    )
    canary = infer(triton, module, model, X, headers={"x-model-label": "canary"})
    np.testing.assert_allclose(canary, affine_reference(test_repo, 2), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        infer(triton, module, model, X, "2"), affine_reference(test_repo, 2), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("remote_protocol", PROTOCOLS)
def test_a_remote_litert_model_answers_through_two_gateways(
    client: tuple[Any, Any], test_repo: Path, remote_protocol: str
) -> None:
    triton, module = client
    x = np.random.default_rng(9).standard_normal((7, 4)).astype(np.float32)
    got = infer(triton, module, f"v2_litert_{remote_protocol}", x)
    np.testing.assert_allclose(got, affine_reference(test_repo, 2, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remote_protocol", PROTOCOLS)
def test_remote_errors_reach_the_client_in_its_protocol(
    client: tuple[Any, Any], remote_protocol: str
) -> None:
    triton, module = client
    is_grpc = module is triton_grpc
    with pytest.raises(InferenceServerException) as caught:
        infer(triton, module, f"v2_affine_{remote_protocol}", np.zeros((2, 5), np.float32))
    assert str(caught.value.status()).removeprefix("StatusCode.") == (
        "INVALID_ARGUMENT" if is_grpc else "400"
    )
    with pytest.raises(InferenceServerException) as caught:
        infer(triton, module, f"v2_missing_{remote_protocol}", X)
    assert str(caught.value.status()).removeprefix("StatusCode.") == ("UNAVAILABLE" if is_grpc else "503")
    assert "no_such_model" in caught.value.message()
    assert "127.0.0.1" not in caught.value.message()


def test_the_client_deadline_reaches_the_remote(v2_gateway: RunningGateway) -> None:
    client = triton_grpc.InferenceServerClient(v2_gateway.grpc)
    tensor = triton_grpc.InferInput("n", [1], "INT64")
    tensor.set_data_from_numpy(np.array([3000], np.int64))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("v2_spin_grpc", [tensor], client_timeout=0.1)
    client.close()
    assert "DEADLINE_EXCEEDED" in str(caught.value.status())


@pytest.mark.parametrize("tf_transport", ["rest", "grpc"])
def test_tf_serving_front_door(v2_gateway: RunningGateway, test_repo: Path, tf_transport: str) -> None:
    import grpc

    with (
        httpx.Client(base_url=v2_gateway.url, timeout=60) as http,
        grpc.insecure_channel(v2_gateway.grpc) as channel,
    ):
        tf = TfServingProtocol(tf_transport, http, channel)
        got, _ = tf.predict("v2_affine_grpc", {"x": X}, label="canary")
    np.testing.assert_allclose(got, affine_reference(test_repo, 2), rtol=1e-6, atol=1e-6)
