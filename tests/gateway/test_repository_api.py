"""Triton's repository extension (index, load, unload), statistics and /metrics, over both protocols."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from scripts.build_models import _save, build_affine
from tests.support import Protocol, RunningGateway

X = np.ones((1, 4), dtype=np.float32)


def index(protocol: Protocol, ready: bool = False) -> list[dict[str, Any]]:
    if protocol.is_grpc:
        entries = protocol.client.get_model_repository_index(as_json=True).get("models", [])
    else:
        entries = protocol.client.get_model_repository_index()
    return [e for e in entries if not ready or e.get("state") == "READY"]


def entry(protocol: Protocol, name: str) -> list[dict[str, Any]]:
    return [e for e in index(protocol) if e["name"] == name]


def test_index_lists_every_model_and_version(protocol: Protocol) -> None:
    by_name = {(e["name"], e.get("version", "")): e for e in index(protocol)}
    assert by_name[("affine", "1")]["state"] == "READY"
    assert by_name[("affine", "2")]["state"] == "READY"
    assert by_name[("mlp", "1")]["state"] == "READY"


def test_index_shows_broken_models_with_their_reason(protocol: Protocol) -> None:
    (artifact,) = entry(protocol, "broken_artifact")
    assert artifact["state"] == "UNAVAILABLE"
    assert "onnxruntime cannot load model.onnx" in artifact["reason"]
    (config,) = entry(protocol, "broken_config")
    assert config["state"] == "UNAVAILABLE"
    assert "labelz" in config["reason"]


def test_index_accepts_an_empty_body(http: httpx.Client) -> None:
    response = http.post("/v2/repository/index", content=b"")
    assert response.status_code == 200
    assert any(e["name"] == "affine" for e in response.json())
    ready_only = http.post("/v2/repository/index", json={"ready": True}).json()
    assert all(e["state"] == "READY" for e in ready_only)


@pytest.fixture
def reloadable(gateway: RunningGateway) -> Iterator[str]:
    yield "reloadable"
    shutil.rmtree(gateway.repo / "reloadable" / "2", ignore_errors=True)
    httpx.post(f"{gateway.url}/v2/repository/models/reloadable/load")


def test_unload_then_load(protocol: Protocol, reloadable: str) -> None:
    client = protocol.client
    assert client.is_model_ready(reloadable)
    client.unload_model(reloadable)
    assert not client.is_model_ready(reloadable)
    (unloaded,) = entry(protocol, reloadable)
    assert (unloaded["state"], unloaded["reason"], unloaded.get("version", "")) == (
        "UNAVAILABLE",
        "not loaded",
        "",
    )
    with pytest.raises(InferenceServerException) as caught:
        client.infer(reloadable, [protocol.input("x", X, "FP32")])
    assert protocol.error_code(caught.value) == ("UNAVAILABLE" if protocol.is_grpc else "503")
    client.load_model(reloadable)
    assert client.is_model_ready(reloadable)
    assert client.infer(reloadable, [protocol.input("x", X, "FP32")]).as_numpy("y").shape == (1, 3)


def test_load_picks_up_a_new_version(protocol: Protocol, gateway: RunningGateway, reloadable: str) -> None:
    """The default policy serves the latest version: a new folder replaces the old one on load."""
    _save(build_affine(2), gateway.repo / reloadable / "2" / "model.onnx")
    protocol.client.load_model(reloadable)
    result = protocol.client.infer(reloadable, [protocol.input("x", X, "FP32")])
    response = result.get_response()
    assert (response.model_version if protocol.is_grpc else response["model_version"]) == "2"
    served = result.as_numpy("y")
    v2 = protocol.client.infer("affine", [protocol.input("x", X, "FP32")], model_version="2").as_numpy("y")
    np.testing.assert_allclose(served, v2)
    assert [e["version"] for e in entry(protocol, reloadable)] == ["2"]


def test_load_of_unknown_model_is_not_found(protocol: Protocol) -> None:
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.load_model("no_such_model")
    assert protocol.error_code(caught.value) == ("NOT_FOUND" if protocol.is_grpc else "404")


def test_load_of_broken_model_reports_why(protocol: Protocol) -> None:
    with pytest.raises(InferenceServerException) as caught:
        protocol.client.load_model("broken_config")
    assert protocol.error_code(caught.value) == ("UNAVAILABLE" if protocol.is_grpc else "503")
    assert "labelz" in caught.value.message()


def stats_of(protocol: Protocol, model: str, version: str) -> dict[str, Any]:
    if protocol.is_grpc:
        stats = protocol.client.get_inference_statistics(model, version, as_json=True)
    else:
        stats = protocol.client.get_inference_statistics(model, version)
    (row,) = stats["model_stats"]
    return row


def test_statistics_count_successes_and_failures(protocol: Protocol) -> None:
    before = stats_of(protocol, "affine", "2")
    for _ in range(3):
        protocol.client.infer(
            "affine", [protocol.input("x", np.ones((2, 4), np.float32), "FP32")], model_version="2"
        )
    with pytest.raises(InferenceServerException):
        protocol.client.infer(
            "affine", [protocol.input("x", np.ones((2, 5), np.float32), "FP32")], model_version="2"
        )
    after = stats_of(protocol, "affine", "2")

    def count(row: dict[str, Any], *path: str) -> int:
        for key in path:
            row = row.get(key, {})
        return int(row or 0)  # gRPC's JSON leaves zero counters out and writes int64 as strings

    assert (
        count(after, "inference_stats", "success", "count")
        - count(before, "inference_stats", "success", "count")
        == 3
    )
    assert (
        count(after, "inference_stats", "fail", "count") - count(before, "inference_stats", "fail", "count")
        == 1
    )
    assert count(after, "inference_count") - count(before, "inference_count") == 6  # three batches of two
    assert count(after, "execution_count") - count(before, "execution_count") == 3
    assert count(after, "inference_stats", "compute_infer", "ns") > count(
        before, "inference_stats", "compute_infer", "ns"
    )
    assert after["name"] == "affine" and after["version"] == "2"


def test_statistics_for_all_models(http: httpx.Client) -> None:
    rows = http.get("/v2/models/stats").json()["model_stats"]
    assert {("affine", "1"), ("affine", "2"), ("mlp", "1")} <= {(r["name"], r["version"]) for r in rows}


def test_metrics_are_labelled_and_split_queue_from_compute(protocol: Protocol, http: httpx.Client) -> None:
    protocol.client.infer("mlp", [protocol.input("input", np.ones((1, 64), np.float32), "FP32")])
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(http.get("/metrics").text)
        for s in family.samples
    }
    labels = {"model": "mlp", "version": "1", "backend": "onnxruntime", "protocol": protocol.name}

    def value(name: str, **extra: str) -> float:
        return samples[(name, tuple(sorted({**labels, **extra}.items())))]

    assert value("modelyard_requests_total", code="200") >= 1
    for family in ("request_duration", "queue_duration", "compute_duration"):
        assert value(f"modelyard_{family}_seconds_count") >= 1, family
    ready = {"model": "affine", "version": "2", "backend": "onnxruntime"}
    assert samples[("modelyard_model_ready", tuple(sorted(ready.items())))] == 1


def test_reload_under_steady_traffic_drops_nothing(gateway: RunningGateway, reloadable: str) -> None:
    """Clients keep calling while the model is loaded again and again: every request is answered."""
    import threading

    stop = threading.Event()
    outcomes: list[int] = []
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}

    def client() -> None:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            for _ in range(5000):  # bounded: stops on the event long before this
                if stop.is_set():
                    return
                outcomes.append(http.post(f"/v2/models/{reloadable}/infer", json=body).status_code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as http:
            for _ in range(6):
                assert http.post(f"/v2/repository/models/{reloadable}/load").status_code == 200
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(outcomes) > 0
    assert set(outcomes) == {200}, {code: outcomes.count(code) for code in set(outcomes)}


def test_polling_follows_the_folder(tmp_path: Path) -> None:
    """With --poll-interval, new versions, new models, config changes and removals take effect by
    themselves; a model unloaded through the API stays unloaded until loaded through it again."""
    from scripts.build_models import build_mlp
    from tests.support import start_gateway

    repo = tmp_path / "repo"
    _save(build_affine(1), repo / "polled" / "1" / "model.onnx")
    gateway = start_gateway(repo, tmp_path / "log.txt", "--poll-interval", "0.2", "--enable-repository-api")
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}

    def served(http: httpx.Client) -> str | None:
        answer = http.post("/v2/models/polled/infer", json=body)
        return answer.json()["model_version"] if answer.status_code == 200 else None

    def eventually(check: Any) -> None:
        for _ in range(300):  # bounded: 30 s at most
            if check():
                return
            time.sleep(0.1)
        raise AssertionError(gateway.output()[-2000:])

    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert served(http) == "1"
            _save(build_affine(2), repo / "polled" / "2" / "model.onnx")
            eventually(lambda: served(http) == "2")  # the default policy serves the latest version
            (repo / "polled" / "config.yaml").write_text("version_policy: all\nlabels: {stable: 1}\n")
            eventually(lambda: served(http) == "1")  # the stable label now chooses
            _save(build_mlp(), repo / "mlp" / "1" / "model.onnx")
            eventually(lambda: http.get("/v2/models/mlp/ready").status_code == 200)
            shutil.rmtree(repo / "mlp")
            eventually(lambda: http.get("/v2/models/mlp/ready").status_code == 404)
            assert http.post("/v2/repository/models/polled/unload").status_code == 200
            time.sleep(1.0)  # five scans: polling must not bring it back
            assert http.get("/v2/models/polled/ready").status_code == 503
            assert http.post("/v2/repository/models/polled/load").status_code == 200
            assert served(http) == "1"
    finally:
        assert gateway.stop() == 0
