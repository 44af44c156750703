"""Warmup: requests a version runs at every load, before it turns ready, from .npz samples beside
config.yaml or generated from its signature; a version whose warmup fails is not ready."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.config import ConfigError, load_model_config
from gateway.repository import scan_model
from gateway.types import Datatype
from scripts.build_models import _save, build_affine, build_matmul
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import build_gather, build_identity

X = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}


def gather_sample(path: Path, index: int) -> None:
    """A request for `gather`: an index past 3 makes ONNX Runtime fail it at run time."""
    np.savez(path, x=np.ones((2, 4), np.float32), idx=np.full((2, 1), index, np.int64))


def index_row(http: httpx.Client, name: str) -> dict[str, Any]:
    (row,) = [r for r in http.post("/v2/repository/index").json() if r["name"] == name]
    return dict(row)


@pytest.fixture(scope="module")
def warm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("warm")
    _save(build_gather(), repo / "gather" / "1" / "model.onnx")
    gather_sample(repo / "gather" / "sample.npz", 1)
    (repo / "gather" / "config.yaml").write_text("warmup: {samples: sample.npz, runs: 3}\n")
    _save(build_affine(1), repo / "generated" / "1" / "model.onnx")
    (repo / "generated" / "config.yaml").write_text("warmup: {runs: 5, batch: 3}\n")
    _save(build_identity(Datatype.BYTES), repo / "strings" / "1" / "model.onnx")
    (repo / "strings" / "config.yaml").write_text("warmup: {runs: 1}\n")
    # On demand, under a budget that od_other's 16 MiB fill: a request to it unloads the others,
    # so od_gather's next request loads (and warms up) again.
    _save(build_matmul(2048, 2048, 0), repo / "od_other" / "1" / "model.onnx")
    _save(build_gather(), repo / "od_gather" / "1" / "model.onnx")
    gather_sample(repo / "od_gather" / "sample.npz", 1)
    (repo / "od_gather" / "config.yaml").write_text("load: on_demand\nwarmup: {samples: [sample.npz]}\n")
    (repo / "od_other" / "config.yaml").write_text("load: on_demand\n")
    return repo


@pytest.fixture(scope="module")
def warm_gateway(warm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    log = tmp_path_factory.mktemp("logs") / "warm.log"
    running = start_gateway(warm_repo, log, "--enable-repository-api", "--model-memory-budget", "25MiB")
    yield running
    assert running.stop() == 0


def test_warmup_from_samples_and_generated_inputs_turns_ready(warm_gateway: RunningGateway) -> None:
    with httpx.Client(base_url=warm_gateway.url, timeout=60) as http:
        assert index_row(http, "gather")["state"] == "READY"
        assert index_row(http, "generated")["state"] == "READY"
        body = {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [5, 6, 7, 8]},
                {"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [2]},
            ]
        }
        assert http.post("/v2/models/gather/infer", json=body).json()["outputs"][0]["data"] == [7.0]
        # Warmup requests are the gateway's own: they are not the model's statistics.
        (stats,) = http.get("/v2/models/generated/stats").json()["model_stats"]
        assert stats["inference_count"] == 0


def test_a_warmed_version_has_its_request_series_before_its_first_request(
    warm_gateway: RunningGateway,
) -> None:
    # Making a version's per-request series costs its first request 0.3 - 0.4 ms: warmup makes them.
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{warm_gateway.url}/metrics", timeout=30).text
    present = {
        (sample.name, sample.labels.get("protocol"), sample.labels.get("code") or sample.labels.get("phase"))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.labels.get("model") == "generated"
    }
    for protocol, code in (("rest", "200"), ("grpc", "OK")):
        assert ("modelyard_requests_total", protocol, code) in present
        assert ("modelyard_request_duration_seconds_count", protocol, None) in present
        assert ("modelyard_request_phase_seconds_count", protocol, "decode") in present
    assert warm_gateway.metric("modelyard_requests_total", model="generated") == 0
    # A version without warmup makes them at its first request, as before.
    assert not any(m == "od_other" for m in _models_with_series(text))


def _models_with_series(text: str) -> set[str]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        sample.labels["model"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "modelyard_request_duration_seconds_count" and "model" in sample.labels
    }


def test_inputs_that_cannot_be_generated_fail_the_load(warm_gateway: RunningGateway) -> None:
    with httpx.Client(base_url=warm_gateway.url, timeout=60) as http:
        row = index_row(http, "strings")
        assert row["state"] == "UNAVAILABLE"
        assert "warmup: input 'INPUT' is BYTES, which cannot be generated" in row["reason"]


def test_warmup_runs_again_at_a_reload(warm_gateway: RunningGateway, warm_repo: Path) -> None:
    """A sample the version cannot answer fails its next load: the warmup ran on the backend."""
    sample = warm_repo / "gather" / "sample.npz"
    try:
        gather_sample(sample, 9)
        with httpx.Client(base_url=warm_gateway.url, timeout=60) as http:
            answer = http.post("/v2/repository/models/gather/load")
            assert answer.status_code == 503
            assert "version 1 is at UNAVAILABLE state" in answer.json()["error"]
            assert "warmup failed" in answer.json()["error"]
            gather_sample(sample, 0)
            assert http.post("/v2/repository/models/gather/load").status_code == 200
            assert index_row(http, "gather")["state"] == "READY"
    finally:
        gather_sample(sample, 1)


def test_warmup_runs_again_when_a_version_loads_after_an_unload_for_room(
    warm_gateway: RunningGateway, warm_repo: Path
) -> None:
    sample = warm_repo / "od_gather" / "sample.npz"
    body = {
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [5, 6, 7, 8]},
            {"name": "idx", "datatype": "INT64", "shape": [1, 1], "data": [0]},
        ]
    }
    other = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2048], "data": [0.0] * 2048}]}
    try:
        with httpx.Client(base_url=warm_gateway.url, timeout=60) as http:
            assert http.post("/v2/models/od_gather/infer", json=body).status_code == 200
            gather_sample(sample, 9)
            assert http.post("/v2/models/od_other/infer", json=other).status_code == 200
            assert index_row(http, "od_gather")["state"] == "LOADABLE"  # unloaded for od_other's room
            answer = http.post("/v2/models/od_gather/infer", json=body)
            assert answer.status_code == 503
            assert "warmup failed" in answer.json()["error"]
    finally:
        gather_sample(sample, 1)


@pytest.mark.parametrize(
    ("warmup", "problem"),
    [
        ("{samples: ../elsewhere.npz}", "must be an .npz file inside the model's folder"),
        ("{samples: [/abs.npz]}", "must be an .npz file inside the model's folder"),
        ("{samples: inputs.json}", "must be an .npz file inside the model's folder"),
        ("{runs: 0}", "warmup.runs: Input should be greater than or equal to 1"),
        ("{batch: 0}", "warmup.batch: Input should be greater than or equal to 1"),
        ("{runz: 2}", "warmup: unknown key 'runz' (did you mean 'runs'?)"),
    ],
)
def test_warmup_config_is_validated(tmp_path: Path, warmup: str, problem: str) -> None:
    (tmp_path / "config.yaml").write_text(f"warmup: {warmup}\n")
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_model_config(tmp_path / "config.yaml")


def test_a_missing_sample_is_a_repository_problem(tmp_path: Path) -> None:
    _save(build_affine(1), tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "config.yaml").write_text("warmup: {samples: [here.npz, gone.npz]}\n")
    np.savez(tmp_path / "m" / "here.npz", x=np.ones((1, 4), np.float32))
    entry = scan_model(tmp_path, "m")
    assert entry.problems == (f"model 'm': warmup sample gone.npz is not a file in {tmp_path / 'm'}",)


@pytest.mark.parametrize(
    ("load", "ok"), [("eager", True), ("on_demand", True), ("lazy", False), ("true", False)]
)
def test_the_load_key_is_validated(tmp_path: Path, load: str, ok: bool) -> None:
    (tmp_path / "config.yaml").write_text(f"load: {load}\n")
    if ok:
        assert load_model_config(tmp_path / "config.yaml").load == load
    else:
        with pytest.raises(ConfigError, match="load: Input should be 'eager' or 'on_demand'"):
            load_model_config(tmp_path / "config.yaml")
