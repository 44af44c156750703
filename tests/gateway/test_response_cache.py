"""The response cache: its bounds and key, then a real gateway whose `mlp` has one, over REST and
gRPC with tritonclient, checked against onnxruntime run directly."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from prometheus_client.parser import text_string_to_metric_families

from gateway.cache import ResponseCache, cache_key
from gateway.config import CacheConfig, ConfigError, load_model_config
from tests.support import ROOT, RunningGateway, start_gateway


def results(*values: float) -> dict[str, np.ndarray]:
    return {"y": np.array(values, dtype=np.float32)}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_key_is_every_inputs_name_dtype_shape_and_bytes_and_the_outputs_asked_for() -> None:
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = cache_key({"x": x}, ["y"])
    assert cache_key({"x": x.copy()}, ["y"]) == base  # the same bytes: the same key
    assert cache_key({"x": np.asfortranarray(x)}, ["y"]) == base  # memory order is not content
    others = [
        cache_key({"x": x.reshape(3, 2)}, ["y"]),
        cache_key({"x": x.astype(np.float64)}, ["y"]),
        cache_key({"x": x + 1}, ["y"]),
        cache_key({"z": x}, ["y"]),
        cache_key({"x": x}, ["y", "z"]),
        cache_key({"x": np.array([b"ab", b"c"], dtype=object)}, ["y"]),
    ]
    assert len({base, *others}) == 1 + len(others)
    assert cache_key({"x": np.array([b"ab", b"c"], dtype=object)}, []) != cache_key(
        {"x": np.array([b"a", b"bc"], dtype=object)}, []
    )


def test_least_recently_used_answers_leave_first_within_entries_bytes_and_ttl() -> None:
    clock = Clock()
    cache = ResponseCache(CacheConfig(max_entries=2, max_bytes=10_000, ttl_s=5), clock)
    cache.put(b"a", results(1))
    cache.put(b"b", results(2))
    assert cache.get(b"a") is not None  # a is now the most recently used
    cache.put(b"c", results(3))
    assert (cache.get(b"b"), len(cache)) == (None, 2)
    assert cache.get(b"a") is not None and cache.get(b"c") is not None
    clock.now += 5
    assert cache.get(b"a") is None and len(cache) == 1  # expired, and dropped
    assert (cache.hits, cache.misses) == (3, 2)
    small = ResponseCache(
        CacheConfig(max_entries=100, max_bytes=2 * (3 + 4 * 2) - 1), clock
    )  # room for one of two
    small.put(b"one", results(1, 2))
    small.put(b"two", results(3, 4))  # together over max_bytes: the older leaves
    assert small.get(b"one") is None and small.get(b"two") is not None
    small.put(b"big", results(*range(100)))  # larger than the whole cache: not kept
    assert small.get(b"big") is None and small.bytes == 4 * 2 + 3
    kept = small.get(b"two")
    assert kept is not None and not kept["y"].flags.writeable  # shared answers cannot be changed


@pytest.mark.parametrize(
    ("cache", "problem"),
    [
        ("{max_entries: 0}", "cache.max_entries: Input should be greater than or equal to 1"),
        ("{ttl_s: 0}", "cache.ttl_s: Input should be greater than 0"),
        ("{max_entry: 3}", "cache: unknown key 'max_entry' (did you mean 'max_entries'?)"),
    ],
)
def test_the_cache_config_is_validated(tmp_path: Path, cache: str, problem: str) -> None:
    (tmp_path / "config.yaml").write_text(f"cache: {cache}\n")
    with pytest.raises(ConfigError) as raised:
        load_model_config(tmp_path / "config.yaml")
    assert problem in str(raised.value)


MLP_CONFIG = "backend: onnxruntime\ncache: {max_entries: 64}\n"


@pytest.fixture(scope="module")
def cached_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    repo = tmp_path_factory.mktemp("cache_repo")
    for name in ("mlp", "mlp_copy"):
        shutil.copytree(ROOT / "model_repo" / "mlp" / "1", repo / name / "1")
        (repo / name / "config.yaml").write_text(MLP_CONFIG)
    # Every request to `shadowing` is copied to mlp_copy, whose cache the copies must not touch.
    shutil.copytree(ROOT / "model_repo" / "mlp" / "1", repo / "shadowing" / "1")
    (repo / "shadowing" / "config.yaml").write_text(MLP_CONFIG + "shadow: [{model: mlp_copy}]\n")
    running = start_gateway(
        repo, tmp_path_factory.mktemp("cache_logs") / "gateway.log", "--enable-repository-api"
    )
    yield running
    running.stop()


def lookups(gateway: RunningGateway, model: str) -> dict[str, float]:
    text = httpx.get(f"{gateway.url}/metrics").text
    found = {"hit": 0.0, "miss": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "modelyard_response_cache_lookups_total" and sample.labels["model"] == model:
                found[sample.labels["outcome"]] += sample.value
    return found


def expected(x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(ROOT / "model_repo" / "mlp" / "1" / "model.onnx"))
    return session.run(["logits"], {"input": x})[0]


def rest_infer(gateway: RunningGateway, x: np.ndarray) -> np.ndarray:
    client = triton_http.InferenceServerClient(gateway.http)
    tensor = triton_http.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    out = triton_http.InferRequestedOutput("logits", binary_data=True)
    try:
        return client.infer("mlp", [tensor], outputs=[out]).as_numpy("logits")
    finally:
        client.close()


def grpc_infer(gateway: RunningGateway, x: np.ndarray, model: str = "mlp") -> np.ndarray:
    client = triton_grpc.InferenceServerClient(gateway.grpc)
    tensor = triton_grpc.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    try:
        return client.infer(model, [tensor]).as_numpy("logits")
    finally:
        client.close()


def test_a_cached_answer_is_byte_identical_over_both_protocols(cached_gateway: RunningGateway) -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    before = lookups(cached_gateway, "mlp")
    first = rest_infer(cached_gateway, x)  # a miss: computed, then kept
    again_rest = rest_infer(cached_gateway, x)  # hits, over either protocol
    again_grpc = grpc_infer(cached_gateway, x)
    after = lookups(cached_gateway, "mlp")
    assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (1, 2)
    np.testing.assert_allclose(first, expected(x), rtol=1e-5, atol=1e-6)
    assert first.tobytes() == again_rest.tobytes() == again_grpc.tobytes()
    other = rest_infer(cached_gateway, x + 1)  # other bytes: a miss, another answer
    assert lookups(cached_gateway, "mlp")["miss"] - before["miss"] == 2
    np.testing.assert_allclose(other, expected(x + 1), rtol=1e-5, atol=1e-6)
    stats = httpx.get(f"{cached_gateway.url}/v2/models/mlp/versions/1/stats").json()
    inference = stats["model_stats"][0]["inference_stats"]
    assert inference["cache_hit"]["count"] >= 2 and inference["cache_miss"]["count"] >= 2
    (row,) = [m for m in httpx.get(f"{cached_gateway.url}/status").json()["models"] if m["name"] == "mlp"]
    cache = row["versions"][0]["cache"]
    assert cache["entries"] >= 2 and cache["hits"] >= 2 and cache["bytes"] > 0
    assert "cache hits / misses" in httpx.get(f"{cached_gateway.url}/status/panel").text


def test_a_reload_starts_an_empty_cache(cached_gateway: RunningGateway) -> None:
    x = np.full((1, 64), 0.25, np.float32)
    grpc_infer(cached_gateway, x)
    warm = lookups(cached_gateway, "mlp")
    grpc_infer(cached_gateway, x)
    assert lookups(cached_gateway, "mlp")["hit"] == warm["hit"] + 1
    reload = httpx.post(f"{cached_gateway.url}/v2/repository/models/mlp/load", timeout=60)
    assert reload.status_code == 200, reload.text
    before = lookups(cached_gateway, "mlp")
    answer = grpc_infer(cached_gateway, x)
    after = lookups(cached_gateway, "mlp")
    assert (after["miss"] - before["miss"], after["hit"] - before["hit"]) == (1, 0)
    np.testing.assert_allclose(answer, expected(x), rtol=1e-5, atol=1e-6)


def test_shadow_copies_do_not_touch_the_targets_cache(cached_gateway: RunningGateway) -> None:
    x = np.full((1, 64), 0.5, np.float32)
    for _ in range(3):
        grpc_infer(cached_gateway, x, model="shadowing")
    deadline = time.monotonic() + 10
    shadowed = 0.0
    while time.monotonic() < deadline and shadowed < 3:
        text = httpx.get(f"{cached_gateway.url}/metrics").text
        shadowed = sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "modelyard_shadow_requests_total" and s.labels.get("model") == "shadowing"
        )
        time.sleep(0.1)
    assert shadowed >= 3  # the copies ran
    assert lookups(cached_gateway, "mlp_copy") == {"hit": 0.0, "miss": 0.0}
    assert lookups(cached_gateway, "shadowing")["hit"] == 2  # the primary's own cache did serve
