"""The TorchServe backend end to end: a real TorchServe (Java 17), managed by the gateway or
remote, called through tritonclient over REST and gRPC."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
import pytest
import torch
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from scripts import build_models, build_torch_models
from tests.support import (
    Protocol,
    RunningGateway,
    StandaloneTorchServe,
    archive_for_torchserve,
    start_gateway,
    torchserve_missing,
)

pytestmark = pytest.mark.skipif(torchserve_missing() is not None, reason=str(torchserve_missing()))

ROWS = np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32)
LOOSE_CONFIG = build_torch_models.MLP_TORCH_CONFIG.replace("shape: [-1, 64]", "shape: [-1, -1]").replace(
    "labels: {stable: 1, canary: 2}\n", ""
)
SAMPLE_CONFIG = "backend: torchserve\ntorchserve: {sample: sample.npz}\n"


@pytest.fixture(scope="module")
def ts_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ts_repo")
    build_torch_models.build_repository(repo)
    build_models._save(build_models.build_mlp(), repo / "mlp" / "1" / "model.onnx")
    # Declares any width, so a wrong one reaches the module and TorchServe has to refuse it.
    loose = repo / "mlp_torch_loose"
    shutil.copytree(repo / "mlp_torch" / "1", loose / "1")
    (loose / "config.yaml").write_text(LOOSE_CONFIG)
    # Declares nothing: the metadata comes from running the sample once.
    sampled = repo / "mlp_torch_sampled"
    shutil.copytree(repo / "mlp_torch" / "2", sampled / "2")
    (sampled / "config.yaml").write_text(SAMPLE_CONFIG)
    np.savez(sampled / "sample.npz", input=ROWS[:2])
    # TorchServe first, the ONNX deployment of the same weights when TorchServe is down.
    guarded = repo / "mlp_guarded"
    shutil.copytree(repo / "mlp_torch" / "1", guarded / "1")
    (guarded / "config.yaml").write_text(LOOSE_CONFIG.replace("[-1, -1]", "[-1, 64]") + "fallback: [mlp]\n")
    return repo


@pytest.fixture(scope="module")
def ts_gateway(ts_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = start_gateway(ts_repo, tmp_path_factory.mktemp("ts_logs") / "gateway.log")
    yield running
    running.stop()


@pytest.fixture(params=["rest", "grpc"])
def ts(request: pytest.FixtureRequest, ts_gateway: RunningGateway) -> Iterator[Protocol]:
    if request.param == "rest":
        client: Any = triton_http.InferenceServerClient(ts_gateway.http, network_timeout=120)
        yield Protocol("rest", triton_http, client)
    else:
        client = triton_grpc.InferenceServerClient(ts_gateway.grpc)
        yield Protocol("grpc", triton_grpc, client)
    client.close()


def torch_reference(repo: Path, version: int, x: np.ndarray) -> np.ndarray:
    module = torch.jit.load(str(repo / "mlp_torch" / str(version) / "model.pt"))
    with torch.no_grad():
        return module(torch.from_numpy(x)).numpy()


def onnx_reference(repo: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx")).run(None, {"input": x})[0]


def served_version(protocol: Protocol, result: Any) -> str:
    response = result.get_response()
    return str(response.model_version if protocol.is_grpc else response["model_version"])


@pytest.mark.parametrize(("requested", "served"), [("", 1), ("1", 1), ("2", 2), ("canary", 2)])
def test_versions_through_torchserve(ts: Protocol, ts_repo: Path, requested: str, served: int) -> None:
    x = ROWS[:1]
    result = ts.client.infer("mlp_torch", [ts.input("input", x, "FP32")], model_version=requested)
    assert served_version(ts, result) == str(served)
    np.testing.assert_allclose(
        result.as_numpy("logits"), torch_reference(ts_repo, served, x), rtol=1e-5, atol=1e-6
    )


def test_same_model_on_onnx_and_torchserve_agrees(ts: Protocol, ts_repo: Path) -> None:
    torch_out = ts.client.infer("mlp_torch", [ts.input("input", ROWS, "FP32")], model_version="1").as_numpy(
        "logits"
    )
    onnx_out = ts.client.infer("mlp", [ts.input("input", ROWS, "FP32")]).as_numpy("logits")
    assert torch_out.shape == onnx_out.shape == (8, 10)
    np.testing.assert_allclose(torch_out, onnx_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(onnx_out, onnx_reference(ts_repo, ROWS), rtol=1e-6)


def test_concurrent_requests_are_batched_and_split_back(ts_gateway: RunningGateway, ts_repo: Path) -> None:
    """TorchServe merges concurrent requests (batch_size 8); each caller must get its own rows."""
    inputs = [np.random.default_rng(i).standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(24)]

    def call(x: np.ndarray) -> np.ndarray:
        client = triton_http.InferenceServerClient(ts_gateway.http)
        tensor = triton_http.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer("mlp_torch", [tensor], model_version="2").as_numpy("logits")

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(call, inputs))
    for x, got in zip(inputs, results, strict=True):
        np.testing.assert_allclose(got, torch_reference(ts_repo, 2, x), rtol=1e-5, atol=1e-6)


def test_metadata_declared_in_config(ts: Protocol) -> None:
    meta = (
        ts.client.get_model_metadata("mlp_torch", as_json=True)
        if ts.is_grpc
        else ts.client.get_model_metadata("mlp_torch")
    )
    assert meta["platform"] == "pytorch_torchscript"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("logits", "FP32", [-1, 10])
    ]


def test_metadata_from_a_sample(ts: Protocol, ts_repo: Path) -> None:
    meta = (
        ts.client.get_model_metadata("mlp_torch_sampled", as_json=True)
        if ts.is_grpc
        else ts.client.get_model_metadata("mlp_torch_sampled")
    )
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", [-1, 64])
    ]
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == [
        ("output0", "FP32", [-1, 10])
    ]
    result = ts.client.infer("mlp_torch_sampled", [ts.input("input", ROWS[:3], "FP32")])
    np.testing.assert_allclose(
        result.as_numpy("output0"), torch_reference(ts_repo, 2, ROWS[:3]), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("model", "width"),
    [("mlp_torch", 63), ("mlp_torch_loose", 63)],
    ids=["refused by the gateway", "refused by the module inside TorchServe"],
)
def test_bad_input_is_invalid_argument(ts: Protocol, model: str, width: int) -> None:
    with pytest.raises(InferenceServerException) as caught:
        ts.client.infer(model, [ts.input("input", np.ones((2, width), np.float32), "FP32")])
    assert ts.error_code(caught.value) == ("INVALID_ARGUMENT" if ts.is_grpc else "400")
    if model == "mlp_torch_loose":
        assert "the model rejected the input" in caught.value.message()


def test_declaring_no_tensors_is_a_clear_load_error(tmp_path: Path) -> None:
    from tests.support import ROOT

    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repo" / "mlp_torch" / "1", repo / "undeclared" / "1")
    (repo / "undeclared" / "config.yaml").write_text("backend: torchserve\n")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "gateway", "repo", "check", str(repo)], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "TorchServe models must declare their tensors" in result.stdout


@pytest.mark.parametrize("protocol_name", ["rest", "grpc"])
@pytest.mark.parametrize(("version", "label"), [(None, None), ("2", None), (None, "canary")])
def test_tf_serving_clients_reach_the_torchserve_model(
    ts_gateway: RunningGateway, ts_repo: Path, protocol_name: str, version: str | None, label: str | None
) -> None:
    """The TF Serving front door serves every model, a TorchServe one too."""
    pytest.importorskip("tensorflow_serving", reason="the TF Serving gRPC API needs the tensorflow extra")
    import grpc

    from tests.support import TfServingProtocol

    with (
        httpx.Client(base_url=ts_gateway.url, timeout=60) as http,
        grpc.insecure_channel(ts_gateway.grpc) as channel,
    ):
        client = TfServingProtocol(protocol_name, http, channel)
        output, served = client.predict("mlp_torch", {"input": ROWS[:2]}, version=version, label=label)
    expected_version = 2 if (version or label) else 1
    np.testing.assert_allclose(
        output, torch_reference(ts_repo, expected_version, ROWS[:2]), rtol=1e-5, atol=1e-6
    )
    if served is not None:
        assert served == str(expected_version)


def java_processes(gateway: RunningGateway) -> list[psutil.Process]:
    return [p for p in psutil.Process(gateway.process.pid).children(recursive=True) if p.name() == "java"]


def wait_for_status(http: httpx.Client, path: str, status: int, gateway: RunningGateway) -> None:
    deadline = time.monotonic() + 180
    while http.get(path).status_code != status:
        assert time.monotonic() < deadline, gateway.output()[-3000:]
        time.sleep(0.2)


def test_killed_torchserve_turns_unavailable_then_recovers(ts_gateway: RunningGateway) -> None:
    with httpx.Client(base_url=ts_gateway.url, timeout=60) as http:
        check_kill_and_recovery(ts_gateway, http)


def check_kill_and_recovery(ts_gateway: RunningGateway, http: httpx.Client) -> None:
    onnx_body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROWS[0].tolist()}]
    }
    (java,) = java_processes(ts_gateway)
    java.kill()
    java.wait(30)
    # Down: TorchServe models answer 503 while the ONNX model keeps serving.
    wait_for_status(http, "/v2/models/mlp_torch/ready", 503, ts_gateway)
    down = http.post("/v2/models/mlp_torch/infer", json={**onnx_body})
    assert down.status_code == 503, down.text
    for _ in range(5):
        assert http.post("/v2/models/mlp/infer", json=onnx_body).status_code == 200
    # A model with a fallback keeps answering, from its ONNX deployment.
    guarded = http.post("/v2/models/mlp_guarded/infer", json=onnx_body)
    assert guarded.status_code == 200, guarded.text
    assert guarded.json()["parameters"] == {"deployment": "mlp"}
    assert 'modelyard_fallbacks_total{model="mlp_guarded",to="mlp"} 1.0' in http.get("/metrics").text
    index = {(e["name"], e["version"]): e for e in http.post("/v2/repository/index").json()}
    assert index[("mlp_torch", "1")]["state"] == "UNAVAILABLE"
    # Back by itself, with its versions registered again.
    wait_for_status(http, "/v2/models/mlp_torch/ready", 200, ts_gateway)
    for version in ("1", "2"):
        answer = http.post(f"/v2/models/mlp_torch/versions/{version}/infer", json=onnx_body)
        assert answer.status_code == 200, answer.text
    assert len(java_processes(ts_gateway)) == 1


def test_shutdown_leaves_no_torchserve_processes(ts_gateway: RunningGateway) -> None:
    """Runs last in this module: stopping the gateway stops Java and every TorchServe worker."""
    descendants = psutil.Process(ts_gateway.process.pid).children(recursive=True)
    assert any(p.name() == "java" for p in descendants)
    assert ts_gateway.stop() == 0
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]


# Remote mode ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote_torchservers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, StandaloneTorchServe]]:
    workdir = tmp_path_factory.mktemp("remote_ts")
    module_file = workdir / "mlp.pt"
    build_torch_models.save_torchscript(build_torch_models.mlp_module(7), torch.zeros(1, 64), module_file)
    servers = {}
    for mode, token_auth in (("token", True), ("open", False)):
        store = workdir / mode / "store"
        store.mkdir(parents=True)
        archive = archive_for_torchserve(module_file, "mlp", ["input"], ["logits"], store)
        servers[mode] = StandaloneTorchServe(workdir / mode, {"mlp": archive}, token_auth)
    try:
        for server in servers.values():
            server.wait_until_serving("mlp")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


REMOTE_CONFIG = """\
backend: torchserve
inputs:  [{{name: input, datatype: FP32, shape: [-1, 64]}}]
outputs: [{{name: logits, datatype: FP32, shape: [-1, 10]}}]
torchserve: {{mode: remote, inference_url: "{inference}", management_url: "{management}", model_name: mlp{auth}}}
"""


@pytest.fixture(scope="module")
def remote_gateway(
    remote_torchservers: dict[str, StandaloneTorchServe], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("remote_repo")
    token, open_ = remote_torchservers["token"], remote_torchservers["open"]
    keys = token.keys()
    models = {
        "with_token": (token, ", token_env: TS_INFERENCE_KEY, management_token_env: TS_MANAGEMENT_KEY"),
        "without_token": (token, ""),
        "open_server": (open_, ""),
    }
    for name, (server, auth) in models.items():
        (repo / name).mkdir()
        (repo / name / "config.yaml").write_text(
            REMOTE_CONFIG.format(inference=server.inference_url, management=server.management_url, auth=auth)
        )
    env = {"TS_INFERENCE_KEY": keys["inference"], "TS_MANAGEMENT_KEY": keys["management"]}
    running = start_gateway(repo, tmp_path_factory.mktemp("remote_logs") / "gateway.log", env=env)
    yield running
    running.stop()


@pytest.mark.parametrize("model", ["with_token", "open_server"], ids=["token auth on", "token auth off"])
@pytest.mark.parametrize("protocol_name", ["rest", "grpc"])
def test_remote_torchserve_serves(remote_gateway: RunningGateway, model: str, protocol_name: str) -> None:
    client: Any
    if protocol_name == "rest":
        client, module = triton_http.InferenceServerClient(remote_gateway.http), triton_http
    else:
        client, module = triton_grpc.InferenceServerClient(remote_gateway.grpc), triton_grpc
    tensor = module.InferInput("input", [3, 64], "FP32")
    tensor.set_data_from_numpy(ROWS[:3])
    result = client.infer(model, [tensor])
    from tests.support import ROOT

    np.testing.assert_allclose(
        result.as_numpy("logits"), onnx_reference(ROOT / "model_repo", ROWS[:3]), rtol=1e-4, atol=1e-5
    )


async def test_torchserve_s_statuses_read_back_through_the_shared_table(
    remote_torchservers: dict[str, StandaloneTorchServe],
) -> None:
    """The same reading as TF Serving's and v2's (tests/gateway/test_error_table.py): a model
    TorchServe does not have is not ready (503), a body over its max_request_size is too large (413)."""
    from adapters.torchserve import TorchServeClient
    from adapters.torchserve import modelyard_handler as wire
    from gateway.errors import ModelNotReady, PayloadTooLarge

    server = remote_torchservers["open"]
    client = TorchServeClient(server.inference_url, server.management_url, None, None, 60.0)
    try:
        small = wire.encode_tensors("inputs", {"input": ROWS[:1]})
        with pytest.raises(ModelNotReady, match="TorchServe answered 404"):
            await client.predict("model 'm' version 1", "no_such_model", None, small, 60.0)
        # TorchServe's default max_request_size is 6553500 bytes; this body is about 7.7 MB.
        large = wire.encode_tensors("inputs", {"input": np.zeros((30_000, 64), np.float32)})
        with pytest.raises(PayloadTooLarge, match="TorchServe answered 413"):
            await client.predict("model 'm' version 1", "mlp", None, large, 60.0)
    finally:
        await client.aclose()
        # The body TorchServe refused mid-upload leaves a socket that closes when the loop next
        # writes to it; give it that pass here, so its close is not left to a later test's GC.
        await asyncio.sleep(0.5)
        gc.collect()


def test_remote_without_the_token_is_unavailable_with_the_reason(remote_gateway: RunningGateway) -> None:
    with httpx.Client(base_url=remote_gateway.url) as http:
        assert http.get("/v2/models/without_token/ready").status_code == 503
        index = http.post("/v2/repository/index").json()
    (entry,) = [e for e in index if e["name"] == "without_token"]
    assert entry["state"] == "UNAVAILABLE"
    assert "refused the management token" in entry["reason"] or "not serving it" in entry["reason"]
    assert os.environ.get("TS_INFERENCE_KEY") is None  # the keys reached the gateway only


def test_remote_model_comes_up_by_itself_when_its_torchserve_starts_late(tmp_path: Path) -> None:
    """The gateway starts first; its remote model waits UNAVAILABLE, and loads on a retry once
    TorchServe answers, with nobody calling the repository API."""
    from tests.support import free_port

    inference, management = free_port(), free_port()
    repo = tmp_path / "repo"
    (repo / "late").mkdir(parents=True)
    (repo / "late" / "config.yaml").write_text(
        REMOTE_CONFIG.format(
            inference=f"http://127.0.0.1:{inference}", management=f"http://127.0.0.1:{management}", auth=""
        )
    )
    gateway = start_gateway(repo, tmp_path / "gateway.log")
    server = None
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as http:
            assert http.get("/v2/models/late/ready").status_code == 503
            module_file = tmp_path / "mlp.pt"
            build_torch_models.save_torchscript(
                build_torch_models.mlp_module(7), torch.zeros(1, 64), module_file
            )
            (tmp_path / "ts" / "store").mkdir(parents=True)
            archive = archive_for_torchserve(
                module_file, "mlp", ["input"], ["logits"], tmp_path / "ts" / "store"
            )
            server = StandaloneTorchServe(
                tmp_path / "ts", {"mlp": archive}, token_auth=False, ports=(inference, management)
            )
            server.wait_until_serving("mlp")
            wait_for_status(http, "/v2/models/late/ready", 200, gateway)
            body = {
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": ROWS[0].tolist()}]
            }
            answer = http.post("/v2/models/late/infer", json=body)
            assert answer.status_code == 200, answer.text
    finally:
        gateway.stop()
        if server is not None:
            server.stop()
    assert "loaded on retry" in gateway.output()
