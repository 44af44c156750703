"""Triton's model control as tritonclient's own examples use it, over both protocols: a load with a
config override for the keys that map onto config.yaml, refusals worded "failed to load", and the
error texts clients read for an unknown model, an unknown version and a failed load."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from scripts.build_models import _save, affine_weights, build_affine
from tests.support import Protocol, RunningGateway, start_gateway

X = np.ones((2, 4), np.float32)


@pytest.fixture(scope="module")
def control_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("control")
    for version in (1, 2):
        _save(build_affine(version), repo / "simple" / str(version) / "model.onnx")
    (repo / "simple" / "config.yaml").write_text("version_policy: all\nlabels: {stable: 1}\n")
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    running = start_gateway(repo, tmp_path_factory.mktemp("logs") / "control.log", "--enable-repository-api")
    yield running
    assert running.stop() == 0


@pytest.fixture(params=["rest", "grpc"])
def proto(request: pytest.FixtureRequest, control_gateway: RunningGateway) -> Iterator[Protocol]:
    if request.param == "grpc":
        client: Any = triton_grpc.InferenceServerClient(control_gateway.grpc)
        yield Protocol("grpc", triton_grpc, client)
    else:
        client = triton_http.InferenceServerClient(control_gateway.http, network_timeout=60)
        yield Protocol("rest", triton_http, client)
    client.load_model("simple")  # back to config.yaml as it is
    client.close()


def config_of(proto: Protocol, model: str) -> dict[str, Any]:
    if proto.is_grpc:
        answer: dict[str, Any] = proto.client.get_model_config(model, as_json=True)["config"]
        return answer
    config: dict[str, Any] = proto.client.get_model_config(model)
    return config


def served(proto: Protocol, model: str = "simple", version: str = "") -> np.ndarray:
    array: np.ndarray = proto.client.infer(
        model, [proto.input("x", X, "FP32")], model_version=version
    ).as_numpy("y")
    return array


def refusal(proto: Protocol, call: Any, *args: Any, **kwargs: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_the_model_control_example_runs_unchanged(proto: Protocol) -> None:
    """The steps of tritonclient's simple_{http,grpc}_model_control.py, on this gateway's model."""
    client = proto.client
    client.load_model("simple")
    assert client.is_model_ready("simple")
    bad = refusal(
        proto, client.load_model, "simple", config='"parameters": {"config": {{"max_batch_size": "16"}}}'
    )
    assert "failed to load" in bad.message()
    np.testing.assert_allclose(served(proto), X @ affine_weights(1)[0] + affine_weights(1)[1], rtol=1e-5)

    client.load_model("simple", config='{"max_batch_size":"16"}')
    assert int(config_of(proto, "simple")["max_batch_size"]) == 16
    np.testing.assert_allclose(served(proto), X @ affine_weights(1)[0] + affine_weights(1)[1], rtol=1e-5)

    client.unload_model("simple")
    assert not client.is_model_ready("simple")
    wrong = refusal(proto, client.load_model, "wrong_model_name")
    assert "failed to load" in wrong.message()
    assert "failed to load 'wrong_model_name', failed to poll from model repository" in wrong.message()


def test_a_load_without_config_goes_back_to_config_yaml(proto: Protocol) -> None:
    proto.client.load_model("simple", config=json.dumps({"max_batch_size": 8}))
    assert int(config_of(proto, "simple")["max_batch_size"]) == 8
    proto.client.load_model("simple")
    assert int(config_of(proto, "simple").get("max_batch_size", 0)) == 0


def test_tritons_keys_map_onto_config_yaml(proto: Protocol) -> None:
    config = {
        "name": "simple",
        "platform": "onnxruntime_onnx",
        "version_policy": {"specific": {"versions": [2]}},
        "max_batch_size": 4,
        "dynamic_batching": {"max_queue_delay_microseconds": 100, "preferred_batch_size": [2, 4]},
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, 4]}],
        "labels": {"stable": 2},  # config.yaml's own key, in its own words
    }
    proto.client.load_model("simple", config=json.dumps(config))
    rendered = config_of(proto, "simple")
    assert rendered["version_policy"] == {"specific": {"versions": [2] if not proto.is_grpc else ["2"]}}
    assert int(rendered["max_batch_size"]) == 4
    np.testing.assert_allclose(served(proto), X @ affine_weights(2)[0] + affine_weights(2)[1], rtol=1e-5)
    unknown = refusal(proto, served, proto, "simple", "1")
    assert unknown.message().startswith("Request for unknown model: 'simple' version 1 is not found")


@pytest.mark.parametrize(
    ("config", "why"),
    [
        (
            {"instance_group": [{"count": 2}]},
            "the config keys ['instance_group'] have no counterpart in config.yaml",
        ),
        ({"name": "other"}, "the config names model 'other'"),
        ({"platform": "tensorrt_plan"}, "platform 'tensorrt_plan' is none of"),
        ({"max_batch_size": "many"}, "max_batch_size must be an integer"),
        ({"dynamic_batching": {"priority_levels": 2}}, "dynamic_batching takes only"),
        ({"input": [{"name": "x", "data_type": "TYPE_WHATEVER", "dims": [4]}]}, "which is no TYPE_*"),
        ({"labels": {"stable": 7}}, "label 'stable' points at version 7"),
        ({"limits": {"max_inflight": 0}}, "limits.max_inflight: Input should be greater than or equal to 1"),
    ],
)
def test_other_keys_and_bad_values_are_refused_and_lose_nothing(
    proto: Protocol, config: dict[str, Any], why: str
) -> None:
    refused = refusal(proto, proto.client.load_model, "simple", config=json.dumps(config))
    assert refused.message().startswith("failed to load 'simple'"), refused.message()
    assert why in refused.message()
    assert proto.error_code(refused) == ("INVALID_ARGUMENT" if proto.is_grpc else "400")
    np.testing.assert_allclose(served(proto), X @ affine_weights(1)[0] + affine_weights(1)[1], rtol=1e-5)


def test_model_files_in_the_request_are_refused(proto: Protocol, tmp_path: Path) -> None:
    refused = refusal(
        proto, proto.client.load_model, "simple", config="{}", files={"file:1/model.onnx": b"\x08\x01"}
    )
    assert (
        "failed to load 'simple', this gateway does not take model files in the request" in refused.message()
    )
    assert proto.error_code(refused) == ("UNIMPLEMENTED" if proto.is_grpc else "501")
    assert proto.client.is_model_ready("simple")


def test_error_texts_are_tritons(proto: Protocol) -> None:
    client = proto.client
    unknown = refusal(proto, served, proto, "nope")
    assert unknown.message().startswith("Request for unknown model: 'nope' is not found")
    assert proto.error_code(unknown) == ("NOT_FOUND" if proto.is_grpc else "404")
    metadata = refusal(proto, client.get_model_metadata, "nope")
    assert "Request for unknown model" in metadata.message()
    version = refusal(proto, served, proto, "simple", "9")
    assert version.message().startswith("Request for unknown model: 'simple' version 9 is not found")
    assert proto.error_code(version) == ("NOT_FOUND" if proto.is_grpc else "404")
    failed = refusal(proto, client.load_model, "broken")
    assert failed.message().startswith("load failed for model 'broken': version 1 is at UNAVAILABLE state: ")
    assert "onnxruntime cannot load model.onnx" in failed.message()
    assert proto.error_code(failed) == ("UNAVAILABLE" if proto.is_grpc else "503")
    not_ready = refusal(proto, served, proto, "broken")
    assert not_ready.message().startswith("Request for unknown model: 'broken' has no available versions")
