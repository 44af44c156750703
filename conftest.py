"""Shared fixtures: a real gateway process on free loopback ports, and the clients users use."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.model_builders import build_test_repository

ROOT = Path(__file__).resolve().parent
STARTUP_TIMEOUT_S = 180  # generous: a loaded 2-core machine starts TorchServe and TensorFlow slowly


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningGateway:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    repo: Path
    log: Path
    # The CA file that verifies the gateway's certificate, when it serves TLS.
    tls_ca: Path | None = None

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls_ca else 'http'}://{self.http}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(
    repo: Path,
    log: Path,
    *args: str,
    env: dict[str, str] | None = None,
    tls_ca: Path | None = None,
    ready_headers: dict[str, str] | None = None,
) -> RunningGateway:
    """Run `modelyard serve` as users do, and wait until it answers ready (over HTTPS, verified
    by `tls_ca`, when the arguments turn TLS on; with `ready_headers` where health needs a key)."""
    http_port, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), *args,
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
    gateway = RunningGateway(process, http_port, grpc_port, repo, log, tls_ca)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}:\n{gateway.output()}")
        try:
            verify = ssl.create_default_context(cafile=str(tls_ca)) if tls_ca else True
            ready = httpx.get(
                f"{gateway.url}/v2/health/ready", timeout=1, verify=verify, headers=ready_headers
            )
            if ready.status_code == 200:
                return gateway
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    gateway.stop()
    raise RuntimeError(f"the gateway was not ready within {STARTUP_TIMEOUT_S}s:\n{gateway.output()}")


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
    from tests.model_builders import build_identity

    repo = tmp_path_factory.mktemp("small_repo")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    for datatype in (Datatype.FP32, Datatype.BYTES):
        _save(build_identity(datatype), repo / f"identity_{datatype.value.lower()}" / "1" / "model.onnx")
    return repo


# Small input limits (tests/reliability): crossed by ordinary test requests, and often by fuzzing.
LIMITED_ENV = {
    "MODELYARD_MAX_REQUEST_BODY_MB": str(64 / 1024),
    "MODELYARD_MAX_TENSOR_ELEMENTS": "1024",
    "MODELYARD_MAX_JSON_DEPTH": "8",
    "MODELYARD_MAX_BYTES_ELEMENT_MB": str(1000 / (1 << 20)),
    "MODELYARD_GRPC_MAX_MESSAGE_MB": "1",
}


@pytest.fixture(scope="session")
def limited_gateway(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    """A gateway over small_repo with LIMITED_ENV's limits and the repository API on."""
    log = tmp_path_factory.mktemp("limited") / "gateway.log"
    running = start_gateway(small_repo, log, "--enable-repository-api", env=LIMITED_ENV)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


# How many generated cases each fuzz test ran, printed at the end of the run.
FUZZ_CASES: dict[str, int] = {}


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


@dataclass
class Protocol:
    """One of tritonclient's two transports, so a test body runs the same case over both."""

    name: str
    module: ModuleType
    client: Any

    @property
    def is_grpc(self) -> bool:
        return self.name == "grpc"

    def input(self, name: str, data: Any, datatype: str, binary: bool = True) -> Any:
        tensor = self.module.InferInput(name, list(data.shape), datatype)
        if self.is_grpc:
            tensor.set_data_from_numpy(data)
        else:
            tensor.set_data_from_numpy(data, binary_data=binary)
        return tensor

    def output(self, name: str, binary: bool = True) -> Any:
        if self.is_grpc:
            return self.module.InferRequestedOutput(name)
        return self.module.InferRequestedOutput(name, binary_data=binary)

    def error_code(self, error: Exception) -> str:
        """The status in the form the table uses: an HTTP status over REST, a gRPC code name over gRPC."""
        status = str(error.status())  # type: ignore[attr-defined]
        return status.removeprefix("StatusCode.")


@pytest.fixture(params=["rest", "grpc"])
def protocol(request: pytest.FixtureRequest, gateway: RunningGateway) -> Iterator[Protocol]:
    if request.param == "rest":
        client = triton_http.InferenceServerClient(gateway.http, network_timeout=60)
        yield Protocol("rest", triton_http, client)
    else:
        client = triton_grpc.InferenceServerClient(gateway.grpc)
        yield Protocol("grpc", triton_grpc, client)
    client.close()


class InProcessGateway:
    """The real Gateway in a thread of this process, for tests that give it their own adapters."""

    def __init__(self, repo: Path, adapter_factory: Any, **settings: Any) -> None:
        from gateway.settings import Settings

        self.settings = Settings(
            model_repo=repo, http_port=free_port(), grpc_port=free_port(), log_level="warning", **settings
        )
        self._factory = adapter_factory
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    @property
    def http(self) -> str:
        return f"127.0.0.1:{self.settings.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    async def _main(self) -> None:
        from gateway.server import Gateway

        gateway = Gateway(self.settings, self._factory)
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await gateway.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            raise
        self._started.set()
        await self._stop.wait()
        await gateway.stop()

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        if not self._started.wait(STARTUP_TIMEOUT_S) or self._error is not None:
            raise RuntimeError(f"in-process gateway did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def torchserve_missing() -> str | None:
    """Why TorchServe cannot run here, or None when it can."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "TorchServe needs Java 17: no java on PATH"
    for module in ("ts", "model_archiver", "torch"):
        if importlib.util.find_spec(module) is None:
            return f"the torchserve extra is not installed (no module {module})"
    return None


def archive_for_torchserve(
    module_file: Path, name: str, inputs: list[str], outputs: list[str], store: Path
) -> Path:
    """A .mar with modelyard's handler, made with torch-model-archiver as a user preparing a remote TorchServe would."""
    import json

    from adapters import torchserve_handler

    extra = store / f"{name}-settings" / torchserve_handler.SETTINGS_FILE
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text(json.dumps({"inputs": inputs, "outputs": outputs, "threads": 1}))
    subprocess.run(
        [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1",
         "--serialized-file", str(module_file), "--handler", torchserve_handler.__file__,
         "--extra-files", str(extra), "--export-path", str(store), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    return store / f"{name}.mar"


class StandaloneTorchServe:
    """A TorchServe of its own, outside any gateway: what remote mode talks to."""

    def __init__(
        self, workdir: Path, models: dict[str, Path], token_auth: bool, ports: tuple[int, int] | None = None
    ) -> None:
        self.workdir = workdir
        self.inference_port, self.management_port = ports or (free_port(), free_port())
        self.token_auth = token_auth
        store = workdir / "store"
        store.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
            "disable_system_metrics=true\ninstall_py_dep_per_model=false\n"
        )
        (workdir / "tmp").mkdir(exist_ok=True)
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
                   "--ts-config", str(config), "--model-store", str(store), "--enable-model-api",
                   "--models", *(f"{name}={path}" for name, path in models.items())]  # fmt: skip
        if not token_auth:
            command.append("--disable-token-auth")
        self.log = workdir / "torchserve.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                command, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TMPDIR": str(workdir / "tmp"), "LOG_LOCATION": str(workdir)},
            )  # fmt: skip

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def keys(self) -> dict[str, str]:
        import json

        keys = json.loads((self.workdir / "key_file.json").read_text())
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}

    def wait_until_serving(self, model: str) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                # TorchServe writes its key file a moment after it starts.
                headers = {"Authorization": f"Bearer {self.keys()['management']}"} if self.token_auth else {}
                answer = httpx.get(f"{self.management_url}/models/{model}", headers=headers, timeout=2)
                if answer.status_code == 200 and any(
                    w["status"] == "READY" for w in answer.json()[0]["workers"]
                ):
                    return
            except (httpx.HTTPError, FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(
            f"TorchServe did not serve {model} in time:\n{self.log.read_text(errors='replace')[-3000:]}"
        )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


# TF Serving -----------------------------------------------------------------------------------


class TfServingError(Exception):
    """A TF Serving API call that failed; `code` is an HTTP status over REST, a gRPC code name over gRPC."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class TfServingProtocol:
    """A TF Serving client over REST (httpx, columnar JSON) or gRPC (the tensorflow-serving-api stubs),
    so a test body runs the same case over both."""

    name: str
    http: httpx.Client
    channel: Any

    @property
    def is_grpc(self) -> bool:
        return self.name == "grpc"

    @staticmethod
    def _rest_prefix(model: str, version: str | None, label: str | None) -> str:
        if version:
            return f"/v1/models/{model}/versions/{version}"
        if label:
            return f"/v1/models/{model}/labels/{label}"
        return f"/v1/models/{model}"

    @staticmethod
    def _model_spec(spec: Any, model: str, version: str | None, label: str | None) -> None:
        spec.name = model
        if version:
            spec.version.value = int(version)
        elif label:
            spec.version_label = label

    def _rest(self, method: str, path: str, body: Any = None) -> Any:
        response = self.http.request(method, path, json=body)
        if response.status_code != 200:
            raise TfServingError(str(response.status_code), response.json()["error"])
        return response.json()

    def _grpc(self, call: Any, request: Any) -> Any:
        import grpc

        try:
            return call(request, timeout=60)
        except grpc.RpcError as exc:
            raise TfServingError(exc.code().name, exc.details()) from None

    def predict(
        self, model: str, inputs: dict[str, Any], version: str | None = None, label: str | None = None
    ) -> tuple[Any, str | None]:
        """The model's one output as numpy (strings as bytes), and the version the answer names
        (gRPC only: TF Serving's REST answer does not say)."""
        import numpy as np

        if not self.is_grpc:
            body = {"inputs": {name: _rest_values(value) for name, value in inputs.items()}}
            answer = self._rest("POST", self._rest_prefix(model, version, label) + ":predict", body)
            output = np.asarray(answer["outputs"])
            if output.dtype.kind == "U":
                output = np.array([v.encode() for v in output.ravel()], dtype=object).reshape(output.shape)
            return output, None
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        request = predict_pb2.PredictRequest()
        self._model_spec(request.model_spec, model, version, label)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(np.asarray(value)))
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        response = self._grpc(stub.Predict, request)
        (proto,) = response.outputs.values()
        return tf.make_ndarray(proto), str(response.model_spec.version.value)

    def status(
        self, model: str, version: str | None = None, label: str | None = None
    ) -> list[tuple[str, str]]:
        """(version, state name) for each version reported."""
        if not self.is_grpc:
            answer = self._rest("GET", self._rest_prefix(model, version, label))
            return [(s["version"], s["state"]) for s in answer["model_version_status"]]
        from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

        request = get_model_status_pb2.GetModelStatusRequest()
        self._model_spec(request.model_spec, model, version, label)
        response = self._grpc(model_service_pb2_grpc.ModelServiceStub(self.channel).GetModelStatus, request)
        state = get_model_status_pb2.ModelVersionStatus.State
        return [(str(s.version), state.Name(s.state)) for s in response.model_version_status]

    def signature(self, model: str, version: str | None = None) -> dict[str, dict[str, Any]]:
        """The serving_default signature as {"inputs"|"outputs": {name: (dtype name, shape)}}."""
        if not self.is_grpc:
            answer = self._rest("GET", self._rest_prefix(model, version, None) + "/metadata")
            signature = answer["metadata"]["signature_def"]["signature_def"]["serving_default"]
            return {
                side: {
                    name: (info["dtype"], [int(d["size"]) for d in info["tensor_shape"]["dim"]])
                    for name, info in signature[side].items()
                }
                for side in ("inputs", "outputs")
            }
        from tensorflow.core.framework import types_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request.model_spec, model, version, None)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        response = self._grpc(stub.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        signature = signatures.signature_def["serving_default"]
        return {
            side: {
                name: (types_pb2.DataType.Name(info.dtype), [d.size for d in info.tensor_shape.dim])
                for name, info in getattr(signature, side).items()
            }
            for side in ("inputs", "outputs")
        }


def float_tensor_proto(shape: list[int], values: list[float]) -> Any:
    """A DT_FLOAT TensorProto built field by field, so shape and values may disagree on purpose."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

    return tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in shape]
        ),
        float_val=values,
    )


def _rest_values(value: Any) -> Any:
    """Numbers as nested lists; bytes as TF Serving's {"b64": ...} objects."""
    import base64

    import numpy as np

    array = np.asarray(value)
    if array.dtype.kind in "OS":
        flat = [{"b64": base64.b64encode(v).decode("ascii")} for v in array.ravel()]
        return np.array(flat, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


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
    from tests.model_builders import build_tfserving_repository

    repo = tmp_path_factory.mktemp("tfserving_repo")
    build_tfserving_repository(repo, grpc_address=gateway.grpc, rest_url=gateway.url)
    running = start_gateway(repo, tmp_path_factory.mktemp("logs") / "tfserving_gateway.log")
    yield running
    running.stop()
