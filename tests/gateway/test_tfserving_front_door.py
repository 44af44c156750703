"""TF Serving's REST and gRPC APIs on the gateway's own ports, for models of every backend.

Each case runs over REST (httpx) and gRPC (the tensorflow-serving-api stubs). Outputs are checked
against onnxruntime run directly on the ONNX `affine`, whose weights the TensorFlow `affine_tf` shares.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from tests.support import ROOT, Protocol, RunningGateway, TfServingError, TfServingProtocol, free_port

RNG_SEED = 20261125
X = np.random.default_rng(RNG_SEED).standard_normal((5, 4)).astype(np.float32)
VERSIONS = [(None, None, 1), ("1", None, 1), ("2", None, 2), (None, "stable", 1), (None, "canary", 2)]


def affine_reference(test_repo: Path, version: int, x: np.ndarray[Any, Any]) -> Any:
    session = ort.InferenceSession(str(test_repo / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


def text_reference(test_repo: Path, texts: list[bytes]) -> list[bytes]:
    session = ort.InferenceSession(str(test_repo / "text_normalizer" / "1" / "model.onnx"))
    (result,) = session.run(None, {"text": np.array([t.decode() for t in texts], dtype=object)})
    return [str(v).encode() for v in result]


@pytest.mark.parametrize("model", ["affine_tf", "affine"])
@pytest.mark.parametrize(("version", "label", "served"), VERSIONS)
def test_tfserving_predict_serves_tf_and_onnx_models(
    tf_protocol: TfServingProtocol,
    test_repo: Path,
    model: str,
    version: str | None,
    label: str | None,
    served: int,
) -> None:
    output, answered_version = tf_protocol.predict(model, {"x": X}, version=version, label=label)
    np.testing.assert_allclose(output, affine_reference(test_repo, served, X), rtol=1e-5, atol=1e-6)
    if tf_protocol.is_grpc:
        assert answered_version == str(served)


@pytest.mark.parametrize(("version", "served"), [("", 1), ("2", 2), ("canary", 2)])
def test_v2_serves_the_tf_model(protocol: Protocol, test_repo: Path, version: str, served: int) -> None:
    result = protocol.client.infer("affine_tf", [protocol.input("x", X, "FP32")], model_version=version)
    np.testing.assert_allclose(
        result.as_numpy("y"), affine_reference(test_repo, served, X), rtol=1e-5, atol=1e-6
    )
    response = result.get_response()
    assert (response.model_version if protocol.is_grpc else response["model_version"]) == str(served)


def test_tf_model_metadata_over_v2(protocol: Protocol) -> None:
    meta = (
        protocol.client.get_model_metadata("affine_tf", as_json=True)
        if protocol.is_grpc
        else (protocol.client.get_model_metadata("affine_tf"))
    )
    assert meta["platform"] == "tensorflow_savedmodel"
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]] == [
        ("x", "FP32", [-1, 4])
    ]


@pytest.mark.parametrize("model", ["affine_tf", "affine"])
def test_metadata_is_the_signature(tf_protocol: TfServingProtocol, model: str) -> None:
    signature = tf_protocol.signature(model, version="2")
    assert signature == {"inputs": {"x": ("DT_FLOAT", [-1, 4])}, "outputs": {"y": ("DT_FLOAT", [-1, 3])}}


def test_status_lists_versions_and_follows_labels(tf_protocol: TfServingProtocol) -> None:
    assert tf_protocol.status("affine_tf") == [("1", "AVAILABLE"), ("2", "AVAILABLE")]
    assert tf_protocol.status("affine", version="2") == [("2", "AVAILABLE")]
    assert tf_protocol.status("affine_tf", label="canary") == [("2", "AVAILABLE")]


def test_status_follows_unload_and_load(tf_protocol: TfServingProtocol, http: httpx.Client) -> None:
    assert tf_protocol.status("toggle_tf") == [("1", "AVAILABLE")]
    assert http.post("/v2/repository/models/toggle_tf/unload").status_code == 200
    try:
        with pytest.raises(TfServingError) as caught:
            tf_protocol.status("toggle_tf")
        assert caught.value.code == ("UNAVAILABLE" if tf_protocol.is_grpc else "503")
    finally:
        assert http.post("/v2/repository/models/toggle_tf/load").status_code == 200
    assert tf_protocol.status("toggle_tf") == [("1", "AVAILABLE")]


def test_rest_versions_are_numbers(http: httpx.Client) -> None:
    response = http.get("/v1/models/affine_tf/versions/canary")
    assert response.status_code == 404
    assert "a label goes in /labels/canary" in response.json()["error"]
    assert http.get("/v1/models/affine_tf/labels/canary").status_code == 200


def test_rows_and_columns_answer_in_their_own_format(http: httpx.Client, test_repo: Path) -> None:
    expected = affine_reference(test_repo, 2, X)
    rows = http.post("/v1/models/affine_tf/versions/2:predict", json={"instances": X.tolist()})
    assert rows.status_code == 200, rows.text
    assert list(rows.json()) == ["predictions"]
    np.testing.assert_allclose(rows.json()["predictions"], expected, rtol=1e-5, atol=1e-6)
    columns = http.post("/v1/models/affine/versions/2:predict", json={"inputs": {"x": X.tolist()}})
    assert columns.status_code == 200, columns.text
    assert list(columns.json()) == ["outputs"]
    np.testing.assert_allclose(columns.json()["outputs"], expected, rtol=1e-5, atol=1e-6)
    named_rows = http.post(
        "/v1/models/affine_tf:predict", json={"instances": [{"x": row} for row in X.tolist()]}
    )
    np.testing.assert_allclose(
        named_rows.json()["predictions"], affine_reference(test_repo, 1, X), rtol=1e-5, atol=1e-6
    )


def test_b64_strings_over_rest(http: httpx.Client, test_repo: Path) -> None:
    texts = [b"The Cat", "caf\u00e9 OF".encode(), b"Hello WORLD"]
    instances = [
        {"b64": base64.b64encode(texts[0]).decode()},
        texts[1].decode(),
        {"b64": base64.b64encode(texts[2]).decode()},
    ]
    response = http.post("/v1/models/text_normalizer:predict", json={"instances": instances})
    assert response.status_code == 200, response.text
    assert [p.encode() for p in response.json()["predictions"]] == text_reference(test_repo, texts)


def test_strings_cross_both_protocols(tf_protocol: TfServingProtocol, test_repo: Path) -> None:
    texts = [b"The Cat", b"of", b"Hello WORLD"]
    output, _ = tf_protocol.predict("text_normalizer", {"text": np.array(texts, dtype=object)})
    assert [bytes(v) for v in output.ravel()] == text_reference(test_repo, texts)


@pytest.mark.parametrize(
    ("model", "inputs", "version", "rest", "grpc"),
    [
        ("no_such_model", {"x": X}, None, "404", "NOT_FOUND"),
        ("affine_tf", {"x": X}, "7", "404", "NOT_FOUND"),
        ("affine_tf", {"x": np.ones((2, 5), np.float32)}, None, "400", "INVALID_ARGUMENT"),
        ("affine", {"z": X}, None, "400", "INVALID_ARGUMENT"),
        ("affine_tf", {"x": X.astype(np.float64)}, None, "400", "INVALID_ARGUMENT"),
        ("broken_artifact", {"INPUT": X}, None, "503", "UNAVAILABLE"),
    ],
    ids=["unknown model", "unknown version", "wrong shape", "wrong input name", "wrong dtype", "not ready"],
)
def test_errors_follow_the_table(
    tf_protocol: TfServingProtocol,
    model: str,
    inputs: dict[str, Any],
    version: str | None,
    rest: str,
    grpc: str,
) -> None:
    if not tf_protocol.is_grpc and inputs.get("x") is not None and inputs["x"].dtype == np.float64:
        pytest.skip("JSON numbers carry no float width: REST reads them as the model's dtype")
    with pytest.raises(TfServingError) as caught:
        tf_protocol.predict(model, inputs, version=version)
    assert caught.value.code == (grpc if tf_protocol.is_grpc else rest)
    assert model in caught.value.message


def test_status_of_unknown_model_and_version(tf_protocol: TfServingProtocol) -> None:
    for model, version in (("no_such_model", None), ("affine_tf", "9")):
        with pytest.raises(TfServingError) as caught:
            tf_protocol.status(model, version=version)
        assert caught.value.code == ("NOT_FOUND" if tf_protocol.is_grpc else "404")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"instances": [[1, 2, 3, 4]], "inputs": [[1, 2, 3, 4]]}', "exactly one of"),
        (b'{"instances": []}', "non-empty"),
        (b'{"signature_name": "other", "instances": [[1, 2, 3, 4]]}', "no signature 'other'"),
        (b'{"instances": [[1, 2], [3]]}', "regular"),
    ],
)
def test_bad_rest_requests_are_400(http: httpx.Client, body: bytes, fragment: str) -> None:
    response = http.post("/v1/models/affine_tf:predict", content=body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]


def test_unknown_signature_over_grpc(gateway: RunningGateway) -> None:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name, request.model_spec.signature_name = "affine_tf", "other"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(X))
    with grpc.insecure_channel(gateway.grpc) as channel, pytest.raises(grpc.RpcError) as caught:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request)
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "no signature 'other'" in caught.value.details()


def test_classify_and_regress_are_unimplemented(gateway: RunningGateway, http: httpx.Client) -> None:
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc, regression_pb2

    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for call, request in (
            (stub.Classify, classification_pb2.ClassificationRequest()),
            (stub.Regress, regression_pb2.RegressionRequest()),
        ):
            request.model_spec.name = "affine_tf"
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
            assert "use Predict" in caught.value.details()
    response = http.post("/v1/models/affine_tf:classify", json={"examples": []})
    assert response.status_code == 501
    assert "use :predict" in response.json()["error"]


def test_grpc_reflection_lists_the_tfserving_services(gateway: RunningGateway) -> None:
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        (answer,) = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
    names = {s.name for s in answer.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"} <= names


def test_gateway_without_the_tensorflow_extra(tmp_path: Path) -> None:
    """Where tensorflow cannot be imported, v2 still serves, TF models say what to install, and the
    TF Serving gRPC services are not mounted."""
    http_port, grpc_port = free_port(), free_port()
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_serving'] = None; "
        "from gateway.cli import app; sys.argv[0] = 'modelyard'; app()"
    )
    command = [
        sys.executable, "-c", code, "serve", "--model-repo", str(ROOT / "model_repo"),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port),
    ]  # fmt: skip
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ)
        )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as client:
            for _ in range(600):
                try:
                    if client.get("/v2/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log.read_text()
                time.sleep(0.1)
            body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
            assert client.post("/v2/models/affine/infer", json=body).status_code == 200
            refused = client.post("/v2/models/affine_tf/infer", json=body)
            assert refused.status_code == 503
            assert "pip install 'modelyard[tensorflow]'" in refused.json()["error"]
            # TF Serving's REST API is plain JSON, so it still serves the models that can run.
            rows = client.post("/v1/models/affine:predict", json={"instances": [[1, 2, 3, 4]]})
            assert rows.status_code == 200
    finally:
        process.terminate()
        process.wait(30)
    assert "TF Serving gRPC API not served" in log.read_text()


def test_metadata_without_a_version_names_the_version_it_serves(gateway: RunningGateway) -> None:
    """affine_tf's labels make version 1 its stable one: the version a request naming none gets."""
    import grpc
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    answer = httpx.get(f"{gateway.url}/v1/models/affine_tf/metadata", timeout=30).json()
    assert answer["model_spec"]["version"] == "1"
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "affine_tf"
    with grpc.insecure_channel(gateway.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(
            request, timeout=30
        )
    assert response.model_spec.version.value == 1


def test_classify_and_regress_on_an_unknown_model_are_404_first(
    gateway: RunningGateway, http: httpx.Client
) -> None:
    import grpc
    from tensorflow_serving.apis import classification_pb2, prediction_service_pb2_grpc, regression_pb2

    with grpc.insecure_channel(gateway.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for call, request in (
            (stub.Classify, classification_pb2.ClassificationRequest()),
            (stub.Regress, regression_pb2.RegressionRequest()),
        ):
            request.model_spec.name = "no_such_model"
            with pytest.raises(grpc.RpcError) as caught:
                call(request)
            assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    for verb in ("classify", "regress"):
        response = http.post(f"/v1/models/no_such_model:{verb}", json={"examples": []})
        assert response.status_code == 404, response.text
        assert response.json() == {"error": "Request for unknown model: 'no_such_model' is not found"}
