"""A model's `split`: a share of its requests answered by another deployment under the model's
name, routing-only config changes applied without a reload, and recorded traffic.

The repository: `source` serves affine v1's weights; `target` serves affine v2's (other answers,
so each answer says which deployment gave it). A real gateway polls the folder every 0.2 s.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from gateway.config import ConfigError, load_model_config
from gateway.repository import scan_model
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import _save, build_affine

X = np.random.default_rng(11).standard_normal((2, 4)).astype(np.float32)
SOURCE = "backend: onnxruntime\nlimits: {max_inflight: 64}\n"
TARGET = "backend: onnxruntime\ntwin_of: source\n"


def metric(gateway: RunningGateway, name: str, **labels: str) -> float:
    text = httpx.get(f"{gateway.url}/metrics").text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def expected(repo: Path, model: str) -> np.ndarray:
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    return session.run(None, {"x": X})[0]


def write_config(repo: Path, model: str, text: str) -> None:
    """Written to a temporary file and renamed, as an editor or `modelyard migrate` does."""
    path = repo / model / "config.yaml"
    temporary = path.with_name(".config.yaml.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def status_of(gateway: RunningGateway, model: str) -> dict:
    models = httpx.get(f"{gateway.url}/status").json()["models"]
    return next(m for m in models if m["name"] == model)


def wait_for_split(gateway: RunningGateway, split: dict[str, float]) -> None:
    for _ in range(200):  # bounded: 20 s
        if status_of(gateway, "source")["split"] == split:
            return
        time.sleep(0.1)
    raise AssertionError(f"the gateway never applied split {split}:\n{gateway.output()[-3000:]}")


def infer(gateway: RunningGateway, headers: dict[str, str] | None = None, version: str = "") -> dict:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": X.ravel().tolist()}]}
    path = f"/v2/models/source/versions/{version}/infer" if version else "/v2/models/source/infer"
    answer = httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def answered_by(answer: dict) -> str:
    return str((answer.get("parameters") or {}).get("deployment", "source"))


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("split_repo")
    _save(build_affine(1), root / "source" / "1" / "model.onnx")
    _save(build_affine(2), root / "target" / "1" / "model.onnx")
    (root / "source" / "config.yaml").write_text(SOURCE)
    (root / "target" / "config.yaml").write_text(TARGET)
    return root


@pytest.fixture(scope="module")
def gateway(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    logs = tmp_path_factory.mktemp("split_logs")
    running = start_gateway(
        repo,
        logs / "gateway.log",
        "--poll-interval",
        "0.2",
        "--enable-repository-api",
        "--record-dir",
        str(logs / "recorded"),
    )
    yield running
    running.stop()


@pytest.fixture
def reset(gateway: RunningGateway, repo: Path) -> Iterator[None]:
    yield
    write_config(repo, "source", SOURCE)
    wait_for_split(gateway, {})


def test_a_split_sends_its_share_to_the_other_deployment_under_the_models_name(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 50}\n")
    wait_for_split(gateway, {"target": 50})
    sent_before = metric(
        gateway, "modelyard_split_requests_total", model="source", to="target", outcome="sent"
    )
    answers = [infer(gateway) for _ in range(60)]
    by = [answered_by(a) for a in answers]
    # 60 draws at 50%: both sides answer (the chance of one side getting none is 2 * 2**-60).
    assert {"source", "target"} == set(by)
    for answer, deployment in zip(answers, by, strict=True):
        assert answer["model_name"] == "source"  # the name the client asked for, whoever answered
        got = np.array(answer["outputs"][0]["data"], dtype=np.float32).reshape(2, 3)
        np.testing.assert_allclose(got, expected(repo, deployment), rtol=1e-5, atol=1e-6)
    sent = metric(gateway, "modelyard_split_requests_total", model="source", to="target", outcome="sent")
    assert sent - sent_before == by.count("target")


def test_a_request_that_names_a_version_is_never_split(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 100}\n")
    wait_for_split(gateway, {"target": 100})
    assert {answered_by(infer(gateway)) for _ in range(5)} == {"target"}
    assert {answered_by(infer(gateway, version="1")) for _ in range(5)} == {"source"}


def test_a_sticky_key_keeps_one_deployment(gateway: RunningGateway, repo: Path, reset: None) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 50}\nrouting: {sticky_header: x-user}\n")
    wait_for_split(gateway, {"target": 50})
    per_user = {
        user: {answered_by(infer(gateway, {"x-user": user})) for _ in range(4)}
        for user in map(str, range(12))
    }
    assert all(len(sides) == 1 for sides in per_user.values()), per_user
    # Twelve keys hashed at 50%: both sides occur (each key's side is fixed by its hash).
    assert {side for sides in per_user.values() for side in sides} == {"source", "target"}


def test_a_split_over_grpc_answers_under_the_models_name(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 100}\n")
    wait_for_split(gateway, {"target": 100})
    client = grpcclient.InferenceServerClient(gateway.grpc)
    try:
        tensor = grpcclient.InferInput("x", [2, 4], "FP32")
        tensor.set_data_from_numpy(X)
        result = client.infer("source", [tensor])
    finally:
        client.close()
    assert result.get_response().model_name == "source"
    assert result.get_response().parameters["deployment"].string_param == "target"
    np.testing.assert_allclose(result.as_numpy("y"), expected(repo, "target"), rtol=1e-5, atol=1e-6)


def test_a_split_to_a_deployment_that_cannot_answer_stays_on_the_model(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 100}\n")
    wait_for_split(gateway, {"target": 100})
    assert httpx.post(f"{gateway.url}/v2/repository/models/target/unload").status_code == 200
    try:
        before = metric(
            gateway, "modelyard_split_requests_total", model="source", to="target", outcome="unavailable"
        )
        assert {answered_by(infer(gateway)) for _ in range(5)} == {"source"}
        after = metric(
            gateway, "modelyard_split_requests_total", model="source", to="target", outcome="unavailable"
        )
        assert after - before == 5
    finally:
        assert httpx.post(f"{gateway.url}/v2/repository/models/target/load").status_code == 200


def test_a_routing_change_applies_without_a_reload_and_any_other_change_reloads(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    loads = {"model": "source", "version": "1", "backend": "onnxruntime", "trigger": "load", "outcome": "ok"}
    before = metric(gateway, "modelyard_model_loads_total", **loads)
    write_config(repo, "source", SOURCE + "split: {target: 10}\nshadow: [{model: target, percent: 5}]\n")
    wait_for_split(gateway, {"target": 10})
    shown = status_of(gateway, "source")["shadow"]
    assert [(t["model"], t["percent"]) for t in shown] == [("target", 5.0)]
    assert metric(gateway, "modelyard_model_loads_total", **loads) == before
    assert "model 'source': shadow, split changed, applied without a reload" in gateway.output()
    # limits is not a routing key: the model loads again.
    write_config(repo, "source", SOURCE.replace("64", "32") + "split: {target: 10}\n")
    for _ in range(200):  # bounded: 20 s
        if metric(gateway, "modelyard_model_loads_total", **loads) > before:
            break
        time.sleep(0.1)
    assert metric(gateway, "modelyard_model_loads_total", **loads) == before + 1


def test_no_shadow_copy_goes_to_the_deployment_that_answered(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    write_config(repo, "source", SOURCE + "split: {target: 100}\nshadow: [{model: target, percent: 100}]\n")
    wait_for_split(gateway, {"target": 100})
    labels = {"model": "source", "target": "target"}
    before = metric(gateway, "modelyard_shadow_requests_total", **labels)
    for _ in range(5):
        infer(gateway)
    time.sleep(0.5)  # a shadow copy, had one been sent, is counted by now
    assert metric(gateway, "modelyard_shadow_requests_total", **labels) == before
    # Answered by the model itself (a version named), the copy is sent and compared: a mismatch.
    infer(gateway, version="1")
    for _ in range(100):
        if metric(gateway, "modelyard_shadow_requests_total", **labels) > before:
            break
        time.sleep(0.1)
    assert metric(gateway, "modelyard_shadow_requests_total", outcome="mismatch", **labels) >= 1
    worst = metric(gateway, "modelyard_shadow_worst_abs_diff", **labels)
    assert worst == pytest.approx(
        float(np.abs(expected(repo, "source") - expected(repo, "target")).max()), rel=1e-5
    )


def test_recorded_traffic_keeps_the_inputs_of_sampled_requests_up_to_its_cap(
    gateway: RunningGateway, repo: Path, reset: None
) -> None:
    folder = (
        Path(
            next(a for a in gateway.process.args if str(a).endswith("recorded"))  # type: ignore[union-attr]
        )
        / "source"
    )
    write_config(repo, "source", SOURCE + "record: {sample: 1, max_requests: 3}\n")
    for _ in range(200):  # bounded: 20 s
        if "record changed" in gateway.output():
            break
        time.sleep(0.1)
    kept_before = metric(gateway, "modelyard_recorded_requests_total", model="source", outcome="kept")
    for _ in range(5):
        infer(gateway)
    for _ in range(100):
        if metric(gateway, "modelyard_recorded_requests_total", model="source", outcome="kept") >= 3:
            break
        time.sleep(0.1)
    files = sorted(folder.glob("*.npz"))
    assert kept_before == 0 and len(files) == 3
    for path in files:
        with np.load(path, allow_pickle=False) as recorded:
            assert list(recorded) == ["x"]
            np.testing.assert_array_equal(recorded["x"], X)
    assert metric(gateway, "modelyard_recorded_requests_total", model="source", outcome="full") == 2
    assert not list(folder.glob(".*.tmp"))


def test_a_split_that_is_not_a_share_is_refused(tmp_path: Path) -> None:
    for text, wording in (
        ("split: {a: 70, b: 40}\n", "add up to 110, more than 100"),
        ("split: {a: 101}\n", "between 0 and 100"),
        ("split: {'../x': 10}\n", "not a model name"),
    ):
        (tmp_path / "config.yaml").write_text(text)
        with pytest.raises(ConfigError, match=wording):
            load_model_config(tmp_path / "config.yaml")


def test_a_split_to_itself_or_to_no_model_is_a_problem_of_the_model(tmp_path: Path) -> None:
    _save(build_affine(1), tmp_path / "m" / "1" / "model.onnx")
    (tmp_path / "m" / "config.yaml").write_text("split: {m: 10, gone: 5}\n")
    problems = scan_model(tmp_path, "m").problems
    assert "model 'm': its split sends requests to itself" in problems
    assert any("split deployment 'gone' is not a model" in p for p in problems)
