"""Auth: every endpoint with no key, a wrong key, a key scoped to another model or another action,
and the right key, over REST (httpx, tritonclient) and gRPC (tritonclient, the TF Serving stubs).
Health and metrics stay open by configuration; the repository API is off unless enabled."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import yaml
from tritonclient.utils import InferenceServerException

from gateway.protocols.http import route_action
from tests.support import RunningGateway, float_tensor_proto, start_gateway

KEYS = {name: secrets.token_urlsafe(24) for name in ("admin", "affine_infer", "other_model", "reader")}
WRONG = secrets.token_urlsafe(24)
KEY_FILE = {
    "keys": [
        {
            "name": "admin",
            "key": KEYS["admin"],
            "models": ["*"],
            "actions": ["infer", "metadata", "repository"],
        },
        {"name": "affine_infer", "key": KEYS["affine_infer"], "models": ["affine"], "actions": ["infer"]},
        {
            "name": "other_model",
            "key": KEYS["other_model"],
            "models": ["identity_fp32"],
            "actions": ["infer", "metadata", "repository"],
        },
        # From the environment, as a deployment's secret would come.
        {"name": "reader", "key_env": "READER_KEY", "models": ["*"], "actions": ["metadata"]},
    ]
}
GOOD = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
PREDICT = {"instances": [[1.0, 2.0, 3.0, 4.0]]}


@pytest.fixture(scope="module")
def authed(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("auth")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump(KEY_FILE))
    running = start_gateway(
        small_repo,
        workdir / "gateway.log",
        "--enable-repository-api",
        "--api-keys-file",
        str(keys),
        env={"READER_KEY": KEYS["reader"], "MODELYARD_LOG_LEVEL": "debug"},
    )
    yield running
    assert running.stop() == 0
    output = running.output()
    assert not [name for name, key in KEYS.items() if key in output], "a key reached the log"
    assert WRONG not in output


def rest_routes(gateway: RunningGateway) -> list[tuple[str, str, str]]:
    """(method, path, action) of every REST route in the OpenAPI document, filled in for affine
    (and /metrics, which the document leaves out)."""
    paths = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()["paths"]
    routes = []
    for template, operations in paths.items():
        path = (
            template.replace("{model_name}", "affine")
            .replace("{model_version}", "1")
            .replace("{model_label}", "stable")
        )
        routes += [(method.upper(), path, route_action(template)) for method in operations]
    return [*routes, ("GET", "/metrics", "metrics")]


def call(
    client: httpx.Client, method: str, path: str, key: str | None, bearer: bool = True
) -> httpx.Response:
    headers = {}
    if key is not None:
        headers = {"Authorization": f"Bearer {key}"} if bearer else {"X-API-Key": key}
    body = None
    if method == "POST":
        body = PREDICT if ":" in path else GOOD
    return client.request(method, path, json=body, headers=headers)


def test_every_rest_route_needs_a_key_of_its_model_and_action(authed: RunningGateway) -> None:
    routes = rest_routes(authed)
    assert len(routes) >= 30
    actions = {action for _, _, action in routes}
    assert actions == {"infer", "metadata", "repository", "health", "metrics"}
    with httpx.Client(base_url=authed.url, timeout=60) as client:
        for method, path, action in routes:
            where = f"{method} {path} ({action})"
            if action in ("health", "metrics"):
                # Open by configuration (the default).
                assert call(client, method, path, None).status_code not in (401, 403), where
                continue
            for key in (None, WRONG, "Basic"):
                answer = call(client, method, path, key)
                assert answer.status_code == 401, (where, answer.text)
                assert answer.json()["error"]
            other = call(client, method, path, KEYS["other_model"])
            if "affine" in path:
                assert other.status_code == 403, (where, other.text)
                assert "may not" in other.json()["error"]
            else:  # a route that names no model: the key's actions decide
                assert other.status_code not in (401, 403), (where, other.text)
            allowed = call(client, method, path, KEYS["admin"], bearer=(len(path) % 2 == 0))
            assert allowed.status_code not in (401, 403), (where, allowed.text)
            narrow = call(client, method, path, KEYS["affine_infer"])
            assert (narrow.status_code not in (401, 403)) == (action == "infer"), (where, narrow.text)
            reader = call(client, method, path, KEYS["reader"])
            assert (reader.status_code not in (401, 403)) == (action == "metadata"), (where, reader.text)
        # The admin key unloaded affine on its way through the routes: load it again.
        assert call(client, "POST", "/v2/repository/models/affine/load", KEYS["admin"]).status_code == 200
        # A key for another model still reaches routes that name no model, for its actions.
        assert call(client, "GET", "/v2", KEYS["other_model"]).status_code == 200
        assert call(client, "POST", "/v2/models/identity_fp32/infer", KEYS["other_model"]).status_code == 400


def test_tritonclient_http_sends_the_key_as_a_header(authed: RunningGateway) -> None:
    client = triton_http.InferenceServerClient(authed.http)
    tensor = triton_http.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32), binary_data=True)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("affine", [tensor])
        assert caught.value.status() == "401"
        answer = client.infer("affine", [tensor], headers={"Authorization": f"Bearer {KEYS['affine_infer']}"})
        assert answer.as_numpy("y").shape == (1, 3)
        assert client.is_server_ready()  # health stays open
    finally:
        client.close()


def grpc_calls(client: Any, model: str) -> dict[str, tuple[str, Callable[[dict[str, str]], Any]]]:
    tensor = triton_grpc.InferInput("x" if model == "affine" else "INPUT", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    return {
        "ModelInfer": ("infer", lambda h: client.infer(model, [tensor], headers=h)),
        "ModelMetadata": ("metadata", lambda h: client.get_model_metadata(model, headers=h)),
        "ModelConfig": ("metadata", lambda h: client.get_model_config(model, headers=h)),
        "ModelReady": ("metadata", lambda h: client.is_model_ready(model, headers=h)),
        "ModelStatistics": ("metadata", lambda h: client.get_inference_statistics(model, headers=h)),
        "RepositoryModelLoad": ("repository", lambda h: client.load_model(model, headers=h)),
        "RepositoryModelUnload": ("repository", lambda h: client.unload_model(model, headers=h)),
    }


def grpc_status(call: Callable[[dict[str, str]], Any], headers: dict[str, str]) -> str:
    try:
        call(headers)
    except InferenceServerException as exc:
        return str(exc.status()).removeprefix("StatusCode.")
    return "OK"


def test_every_grpc_method_needs_a_key_of_its_model_and_action(authed: RunningGateway) -> None:
    client = triton_grpc.InferenceServerClient(authed.grpc)

    def bearer(name: str) -> dict[str, str]:
        return {"authorization": f"Bearer {KEYS[name]}"}

    try:
        calls = grpc_calls(client, "affine")
        for method, (action, method_call) in calls.items():
            for headers in ({}, {"authorization": f"Bearer {WRONG}"}, {"x-api-key": WRONG}):
                assert grpc_status(method_call, headers) == "UNAUTHENTICATED", (method, headers)
            assert grpc_status(method_call, bearer("other_model")) == "PERMISSION_DENIED", method
            assert (grpc_status(method_call, bearer("affine_infer")) == "OK") == (action == "infer"), method
            assert (grpc_status(method_call, bearer("reader")) == "OK") == (action == "metadata"), method
        # Load before unload, so affine is served again at the end.
        for method in ("RepositoryModelUnload", "RepositoryModelLoad", "ModelInfer", "ModelMetadata"):
            assert grpc_status(calls[method][1], {"x-api-key": KEYS["admin"]}) == "OK", method
        other = grpc_calls(client, "identity_fp32")
        assert grpc_status(other["ModelInfer"][1], bearer("other_model")) == "OK"
        assert grpc_status(lambda h: client.get_server_metadata(headers=h), {}) == "UNAUTHENTICATED"
        assert grpc_status(lambda h: client.get_model_repository_index(headers=h), bearer("reader")) == "OK"
        # Health stays open.
        assert client.is_server_live() and client.is_server_ready()
    finally:
        client.close()


def test_each_request_on_a_stream_needs_a_key_of_its_model(authed: RunningGateway) -> None:
    """ModelStreamInfer checks each request for the model it names: a refused one is an error
    response, and the stream serves the next."""
    import queue

    def stream(headers: dict[str, str]) -> list[tuple[str, str | None]]:
        client = triton_grpc.InferenceServerClient(authed.grpc)
        answers: queue.Queue[tuple[str, str | None]] = queue.Queue()
        client.start_stream(
            callback=lambda result, error: answers.put(
                ("error", error.message()) if error is not None else (result.get_response().id, None)
            ),
            headers=headers,
        )
        try:
            for index, (model, name) in enumerate(
                (("affine", "x"), ("identity_fp32", "INPUT"), ("affine", "x"))
            ):
                tensor = triton_grpc.InferInput(name, [1, 4], "FP32")
                tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
                client.async_stream_infer(model, [tensor], request_id=f"{model}-{index}")
            return sorted(answers.get(timeout=60) for _ in range(3))
        finally:
            client.stop_stream()
            client.close()

    scoped = stream({"authorization": f"Bearer {KEYS['affine_infer']}"})
    assert [answer for answer, _ in scoped] == ["affine-0", "affine-2", "error"]
    assert "may not infer on model 'identity_fp32'" in str(scoped[2][1])
    nobody = stream({})
    assert [answer for answer, _ in nobody] == ["error"] * 3
    assert all("needs an API key" in str(message) for _, message in nobody)
    admin = stream({"x-api-key": KEYS["admin"]})
    assert [answer for answer, _ in admin] == ["affine-0", "affine-2", "identity_fp32-1"]


def test_tfserving_grpc_needs_a_key(authed: RunningGateway) -> None:
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    predict = predict_pb2.PredictRequest()
    predict.model_spec.name = "affine"
    predict.inputs["x"].CopyFrom(float_tensor_proto([1, 4], [1, 2, 3, 4]))
    metadata = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    metadata.model_spec.name = "affine"
    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "affine"
    with grpc.insecure_channel(authed.grpc) as channel:
        prediction = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        models = model_service_pb2_grpc.ModelServiceStub(channel)
        for stub_call, request, action in (
            (prediction.Predict, predict, "infer"),
            (prediction.GetModelMetadata, metadata, "metadata"),
            (models.GetModelStatus, status, "metadata"),
        ):
            for metadata_pairs, expected in (
                ((), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {WRONG}"),), grpc.StatusCode.UNAUTHENTICATED),
                ((("authorization", f"Bearer {KEYS['other_model']}"),), grpc.StatusCode.PERMISSION_DENIED),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    stub_call(request, metadata=metadata_pairs, timeout=30)
                assert caught.value.code() == expected, (stub_call, metadata_pairs)
            stub_call(request, metadata=(("authorization", f"Bearer {KEYS['admin']}"),), timeout=30)
            narrow = (("authorization", f"Bearer {KEYS['affine_infer']}"),)
            if action == "infer":
                stub_call(request, metadata=narrow, timeout=30)
            else:
                with pytest.raises(grpc.RpcError) as caught:
                    stub_call(request, metadata=narrow, timeout=30)
                assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_keys_from_the_environment_closed_health_and_the_repository_api_off(
    small_repo: Path, tmp_path: Path
) -> None:
    env = {
        "MODELYARD_API_KEYS": json.dumps(KEY_FILE["keys"][:2]),
        "MODELYARD_AUTH_OPEN_HEALTH": "false",
        "MODELYARD_AUTH_OPEN_METRICS": "false",
    }
    admin = {"X-API-Key": KEYS["admin"]}
    grpc_admin = {"x-api-key": KEYS["admin"]}
    gateway = start_gateway(small_repo, tmp_path / "log.txt", env=env, ready_headers=admin)
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert http.post("/v2/models/affine/infer", json=GOOD).status_code == 401
            answer = http.post(
                "/v2/models/affine/infer", json=GOOD, headers={"X-API-Key": KEYS["affine_infer"]}
            )
            assert answer.status_code == 200
            # Health and metrics closed by configuration: any valid key opens them.
            for path in ("/v2/health/ready", "/v2/health/live", "/metrics"):
                assert http.get(path).status_code == 401, path
                assert http.get(path, headers={"X-API-Key": WRONG}).status_code == 401, path
                assert http.get(path, headers={"X-API-Key": KEYS["affine_infer"]}).status_code == 200, path
            # The repository API is off by default: even a key allowed to use it gets 403.
            for action in ("load", "unload"):
                refused = http.post(f"/v2/repository/models/affine/{action}", headers=admin)
                assert refused.status_code == 403, refused.text
                assert "repository API is disabled" in refused.json()["error"]
                assert "--enable-repository-api" in refused.json()["error"]
            assert http.post("/v2/repository/index", headers=admin).status_code == 200
        for method_call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as caught:
                method_call("affine", headers=grpc_admin)
            assert caught.value.status() == "StatusCode.PERMISSION_DENIED"
            assert "repository API is disabled" in str(caught.value)
        with pytest.raises(InferenceServerException) as caught:
            client.is_server_ready()
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_ready(headers=grpc_admin)
        assert client.is_model_ready("affine", headers=grpc_admin)
        assert KEYS["admin"] not in gateway.output()
    finally:
        client.close()
        assert gateway.stop() == 0


def test_a_bad_keys_file_stops_the_gateway_with_a_clear_message(small_repo: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "short", "key": "tooshort", "models": ["*"]}]}))
    with pytest.raises(RuntimeError) as caught:
        start_gateway(small_repo, tmp_path / "log.txt", "--api-keys-file", str(keys))
    message = str(caught.value)
    assert "API keys in" in message and "actions" in message
    assert "tooshort" not in message


# Aggregates: every route that reports on many models shows a key only the models it may see ------

SCOPED_KEYS = {name: secrets.token_urlsafe(24) for name in ("ops", "affine_only", "everything_reader")}
SCOPED_FILE = {
    "keys": [
        # The one kind of key that sees process details (pid, memory).
        {"name": "ops", "key": SCOPED_KEYS["ops"], "models": ["*"], "actions": ["metadata", "admin"]},
        {"name": "affine_only", "key": SCOPED_KEYS["affine_only"], "models": ["affine"], "actions": ["infer", "metadata"]},
        {"name": "everything_reader", "key": SCOPED_KEYS["everything_reader"], "models": ["*"], "actions": ["metadata"]},
    ]
}  # fmt: skip
OTHERS = ("identity_fp32", "identity_bytes")


@pytest.fixture(scope="module")
def scoped(small_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    workdir = tmp_path_factory.mktemp("scoped")
    keys = workdir / "keys.yaml"
    keys.write_text(yaml.safe_dump(SCOPED_FILE))
    running = start_gateway(
        small_repo,
        workdir / "gateway.log",
        "--api-keys-file",
        str(keys),
        env={"MODELYARD_AUTH_OPEN_METRICS": "false"},
    )
    # Traffic on every model, so each has statistics and series to leak.
    with httpx.Client(base_url=running.url, timeout=30) as http:
        admin = {"X-API-Key": SCOPED_KEYS["ops"]}
        for model, name, datatype, data in (
            ("affine", "x", "FP32", [1, 2, 3, 4]),
            ("identity_fp32", "INPUT", "FP32", [1, 2, 3, 4]),
            ("identity_bytes", "INPUT", "BYTES", ["a", "b", "c", "d"]),
        ):
            body = {"inputs": [{"name": name, "datatype": datatype, "shape": [1, 4], "data": data}]}
            http.post(
                f"/v2/models/{model}/infer", json=body, headers={"X-API-Key": SCOPED_KEYS["affine_only"]}
            )
            http.post(f"/v2/models/{model}/infer", json=body, headers=admin)
    yield running
    assert running.stop() == 0


def aggregate_views(gateway: RunningGateway, key: str | None) -> dict[str, tuple[int, str]]:
    """(status, body) of each aggregate route, REST and gRPC, seen with `key`."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    views: dict[str, tuple[int, str]] = {}
    with httpx.Client(base_url=gateway.url, timeout=30, headers=headers) as http:
        for name, method, path in (
            ("stats", "GET", "/v2/models/stats"),
            ("index", "POST", "/v2/repository/index"),
            ("status", "GET", "/status"),
            ("page", "GET", "/"),
            ("panel", "GET", "/status/panel"),
            ("metrics", "GET", "/metrics"),
        ):
            answer = http.request(method, path)
            views[name] = (answer.status_code, answer.text)
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    grpc_headers = {} if key is None else {"authorization": f"Bearer {key}"}
    try:
        for name, grpc_call in (
            ("grpc stats", lambda: client.get_inference_statistics("", headers=grpc_headers, as_json=True)),
            ("grpc index", lambda: client.get_model_repository_index(headers=grpc_headers, as_json=True)),
        ):
            try:
                views[name] = (200, str(grpc_call()))
            except InferenceServerException as exc:
                views[name] = (401 if "UNAUTHENTICATED" in str(exc.status()) else 403, str(exc))
    finally:
        client.close()
    return views


def test_every_aggregate_shows_a_key_only_what_it_may_see(scoped: RunningGateway) -> None:
    for key in (None, WRONG):
        for route, (status, body) in aggregate_views(scoped, key).items():
            assert status == 401, (route, key, body[:200])

    narrow = aggregate_views(scoped, SCOPED_KEYS["affine_only"])
    for route, (status, body) in narrow.items():
        assert status == 200, (route, body[:200])
        assert "affine" in body, route
        for other in OTHERS:
            assert other not in body, (route, other)
        # Process details are an operator's: no pid, no memory, no process series.
        assert "rss_bytes" not in body and "process_resident_memory" not in body, route
    status = json.loads(narrow["status"][1])
    assert [m["name"] for m in status["models"]] == ["affine"]
    assert status["processes"] == [] and {e["name"] for e in status["index"]} == {"affine"}
    assert status["workers"] == [] and status["worker_count"] == 1 and status["supervisor_pid"] is None
    assert all(v["pid"] is None for m in status["models"] for v in m["versions"])
    assert "Processes" not in narrow["page"][1] or "an admin key" in narrow["page"][1]

    reader = aggregate_views(scoped, SCOPED_KEYS["everything_reader"])
    for route, (status, body) in reader.items():
        assert status == 200, (route, body[:200])
        assert all(name in body for name in ("affine", *OTHERS)), route
        assert "rss_bytes" not in body and "process_resident_memory" not in body, route
    assert json.loads(reader["status"][1])["processes"] == []

    ops = aggregate_views(scoped, SCOPED_KEYS["ops"])
    for route, (status, body) in ops.items():
        assert status == 200, (route, body[:200])
        assert all(name in body for name in ("affine", *OTHERS)), route
    processes = json.loads(ops["status"][1])["processes"]
    assert processes and processes[0]["pid"] == scoped.process.pid and processes[0]["rss_bytes"] > 0
    assert "process_resident_memory_bytes" in ops["metrics"][1]
