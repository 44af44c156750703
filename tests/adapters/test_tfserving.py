"""The tfserving adapter against a TF Serving API: the session gateway's own front door.

TF Serving's server binary cannot run here (not on PyPI or Debian, no Docker), so the remote is a
second modelyard serving a real SavedModel (in-process TensorFlow) and ONNX models through its TF
Serving-compatible REST and gRPC API. Both ends use the official tensorflow-serving-api protos. Each
case runs over gRPC and over REST.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from adapters import SharedResources, adapter_class
from adapters.base import LoadSpec
from adapters.tfserving import TfServingAdapter
from gateway.config import ModelConfig
from gateway.errors import BackendUnavailable, DeadlineExceeded, InvalidInput, ModelNotReady
from gateway.types import Datatype, TensorSpec
from tests.support import RunningGateway, free_port

X = np.random.default_rng(20261125).standard_normal((3, 4)).astype(np.float32)
TRANSPORTS = ["grpc", "rest"]


def affine_reference(test_repo: Path, version: int) -> Any:
    session = ort.InferenceSession(str(test_repo / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": X})[0]


@pytest.fixture
async def shared() -> AsyncIterator[SharedResources]:
    """The connections of one test's adapters, closed after it as the registry closes them."""
    resources = SharedResources()
    yield resources
    await resources.aclose()


def spec_for(
    shared: SharedResources,
    remote: RunningGateway | None,
    transport: str,
    model_name: str,
    version: int = 1,
    **options: Any,
) -> LoadSpec:
    if remote is None:
        address = (
            {"grpc": f"127.0.0.1:{free_port()}"}
            if transport == "grpc"
            else {"rest": f"http://127.0.0.1:{free_port()}"}
        )
    else:
        address = {"grpc": remote.grpc} if transport == "grpc" else {"rest": remote.url}
    config = ModelConfig(backend="tfserving", tfserving={**address, "model_name": model_name, **options})
    return LoadSpec("local", version, Path("/nonexistent"), None, config, shared=shared)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("version", [1, 2])
async def test_predict_matches_the_tf_model(
    shared: SharedResources, gateway: RunningGateway, test_repo: Path, transport: str, version: int
) -> None:
    async with TfServingAdapter(spec_for(shared, gateway, transport, "affine_tf", version)) as adapter:
        assert await adapter.ready()
        signature = await adapter.metadata()
        assert signature.inputs == (TensorSpec("x", Datatype.FP32, (-1, 4)),)
        assert signature.outputs == (TensorSpec("y", Datatype.FP32, (-1, 3)),)
        assert signature.platform == "tensorflow_serving"
        result = await adapter.infer({"x": X}, ["y"])
    np.testing.assert_allclose(result["y"], affine_reference(test_repo, version), rtol=1e-5, atol=1e-6)
    assert result["y"].dtype == np.float32
    assert not await adapter.ready()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_strings_cross(
    shared: SharedResources, gateway: RunningGateway, test_repo: Path, transport: str
) -> None:
    texts = [b"The Cat", b"of", "caf\u00e9 OF".encode()]
    async with TfServingAdapter(spec_for(shared, gateway, transport, "text_normalizer")) as adapter:
        result = await adapter.infer({"text": np.array(texts, dtype=object)}, ["normalized"])
    session = ort.InferenceSession(str(test_repo / "text_normalizer" / "1" / "model.onnx"))
    (expected,) = session.run(None, {"text": np.array([t.decode() for t in texts], dtype=object)})
    assert [bytes(v) for v in result["normalized"]] == [str(v).encode() for v in expected]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("model", "version"), [("no_such_model", 1), ("affine_tf", 9)])
async def test_unknown_remote_model_or_version_is_not_ready(
    shared: SharedResources, gateway: RunningGateway, transport: str, model: str, version: int
) -> None:
    adapter = TfServingAdapter(spec_for(shared, gateway, transport, model, version))
    with pytest.raises(
        ModelNotReady, match=rf"model 'local' version {version}: TF Serving model '{model}'"
    ) as caught:
        await adapter.load()
    assert caught.value.__cause__ is not None
    assert not await adapter.ready()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rejected_input_is_invalid(
    shared: SharedResources, gateway: RunningGateway, transport: str
) -> None:
    async with TfServingAdapter(spec_for(shared, gateway, transport, "affine_tf")) as adapter:
        with pytest.raises(InvalidInput, match="version 1") as caught:
            await adapter.infer({"x": np.ones((2, 5), np.float32)}, ["y"])
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_nothing_listening_is_unavailable(shared: SharedResources, transport: str) -> None:
    with pytest.raises(BackendUnavailable, match="model 'local' version 1"):
        await TfServingAdapter(spec_for(shared, None, transport, "affine_tf")).load()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_remote_deadline_is_deadline_exceeded(
    shared: SharedResources, gateway: RunningGateway, transport: str
) -> None:
    """spin_deadline has timeout_ms 50 on the remote; an n=3000 product takes far longer on any CPU."""
    async with TfServingAdapter(spec_for(shared, gateway, transport, "spin_deadline")) as adapter:
        with pytest.raises(DeadlineExceeded, match="model 'local' version 1") as caught:
            await adapter.infer({"n": np.array([3000], np.int64)}, ["sum"])
    assert caught.value.__cause__ is not None


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unknown_signature_is_not_ready(
    shared: SharedResources, gateway: RunningGateway, transport: str
) -> None:
    adapter = TfServingAdapter(spec_for(shared, gateway, transport, "affine_tf", signature_name="other"))
    with pytest.raises(ModelNotReady, match="signature 'other'"):
        await adapter.load()


def test_config_needs_an_address() -> None:
    config = ModelConfig(backend="tfserving", tfserving={"model_name": "m"})
    with pytest.raises(ModelNotReady, match="give grpc"):
        adapter_class("tfserving")(LoadSpec("local", 1, Path("."), None, config))


# Through a second gateway ---------------------------------------------------------------------


@pytest.fixture(params=["rest", "grpc"])
def proxy(request: pytest.FixtureRequest, tfserving_gateway: RunningGateway) -> Iterator[Any]:
    """tritonclient on the gateway whose models are `backend: tfserving`."""
    if request.param == "rest":
        client: Any = triton_http.InferenceServerClient(tfserving_gateway.http)
        client.module = triton_http
    else:
        client = triton_grpc.InferenceServerClient(tfserving_gateway.grpc)
        client.module = triton_grpc
    yield client
    client.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("requested", "served"), [("", 1), ("1", 1), ("2", 2), ("stable", 1), ("canary", 2)])
def test_gateway_over_tfserving(
    proxy: Any, gateway: RunningGateway, test_repo: Path, transport: str, requested: str, served: int
) -> None:
    tensor = proxy.module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = proxy.infer(f"remote_affine_{transport}", [tensor], model_version=requested)
    response = result.get_response()
    is_grpc = proxy.module is triton_grpc
    assert (response.model_version if is_grpc else response["model_version"]) == str(served)
    # The same TensorFlow model asked directly gives the very same floats.
    direct = triton_http.InferenceServerClient(gateway.http)
    direct_input = triton_http.InferInput("x", list(X.shape), "FP32")
    direct_input.set_data_from_numpy(X)
    expected = direct.infer("affine_tf", [direct_input], model_version=str(served)).as_numpy("y")
    direct.close()
    np.testing.assert_array_equal(result.as_numpy("y"), expected)
    np.testing.assert_allclose(
        result.as_numpy("y"), affine_reference(test_repo, served), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_local_version_can_stand_for_a_remote_label(proxy: Any, test_repo: Path, transport: str) -> None:
    tensor = proxy.module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = proxy.infer(f"remote_pinned_{transport}", [tensor], model_version="1")
    np.testing.assert_allclose(result.as_numpy("y"), affine_reference(test_repo, 2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_versions_listed_in_config_need_no_folders(proxy: Any, test_repo: Path, transport: str) -> None:
    tensor = proxy.module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    for local, remote in (("1", 1), ("2", 2)):
        result = proxy.infer(f"remote_listed_{transport}", [tensor], model_version=local)
        np.testing.assert_allclose(
            result.as_numpy("y"), affine_reference(test_repo, remote), rtol=1e-5, atol=1e-6
        )


def test_scan_lists_config_versions_only_for_tfserving(tmp_path: Path) -> None:
    from gateway.repository import scan_model

    for name, backend in (("remote", "tfserving"), ("local", "onnxruntime")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(
            f"backend: {backend}\nversion_policy: all\ntfserving: {{grpc: 'h:1', versions: {{3: 3, 5: stable}}}}\n"
        )
    remote = scan_model(tmp_path, "remote")
    assert remote.ok, remote.problems
    assert [(v.version, v.artifact) for v in remote.versions] == [(3, None), (5, None)]
    assert "no numeric version folders" in " ".join(scan_model(tmp_path, "local").problems)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_versions_of_one_address_share_one_connection(
    shared: SharedResources, gateway: RunningGateway, transport: str
) -> None:
    first = TfServingAdapter(spec_for(shared, gateway, transport, "affine_tf", 1))
    second = TfServingAdapter(spec_for(shared, gateway, transport, "affine_tf", 2))
    async with first, second:
        assert (first._channel, first._http) == (second._channel, second._http)
        assert (first._channel or first._http) is not None
        await first.aclose()
        # The other version's connection stays open while it is in use.
        assert (await second.infer({"x": X}, ["y"]))["y"].shape == (3, 3)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_unknown_remote_model_is_unavailable_with_the_reason(
    tfserving_gateway: RunningGateway, transport: str
) -> None:
    index = httpx.post(f"{tfserving_gateway.url}/v2/repository/index", timeout=30).json()
    (entry,) = [e for e in index if e["name"] == f"remote_missing_{transport}"]
    assert entry["state"] == "UNAVAILABLE"
    assert "TF Serving model 'no_such_model' version 1" in entry["reason"]
    assert ("NOT_FOUND" if transport == "grpc" else "HTTP 404") in entry["reason"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_readiness_follows_the_remote(
    gateway: RunningGateway, tfserving_gateway: RunningGateway, proxy: Any, transport: str
) -> None:
    model = f"remote_toggle_{transport}"
    tensor = proxy.module.InferInput("x", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    assert proxy.is_model_ready(model)
    assert httpx.post(f"{gateway.url}/v2/repository/models/toggle_tf/unload", timeout=30).status_code == 200
    try:
        assert not proxy.is_model_ready(model)
        with pytest.raises(InferenceServerException) as caught:
            proxy.infer(model, [tensor])
        assert str(caught.value.status()).removeprefix("StatusCode.") in ("503", "UNAVAILABLE")
    finally:
        assert httpx.post(f"{gateway.url}/v2/repository/models/toggle_tf/load", timeout=60).status_code == 200
    assert proxy.is_model_ready(model)
    assert proxy.infer(model, [tensor]).as_numpy("y").shape == (3, 3)
