"""Routing rules over REST and gRPC: labels by header or parameter, header canaries, sticky traffic
splits, and the version that answered reported back. Model `routed`: affine v1 and v2, traffic
50/50, sticky on X-User-Id, canary rules on x-canary and x-beta-tester (tests/support/model_builders.py)."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from gateway.repository import scan_model
from tests.support import Protocol

X = np.ones((1, 4), dtype=np.float32)


def served(protocol: Protocol, headers: dict[str, str] | None = None, **kwargs: Any) -> str:
    # A copy: tritonclient's HTTP client writes its own headers into the dict it is given.
    sent = dict(headers) if headers else None
    result = protocol.client.infer("routed", [protocol.input("x", X, "FP32")], headers=sent, **kwargs)
    response = result.get_response()
    return str(response.model_version if protocol.is_grpc else response["model_version"])


@pytest.mark.parametrize(
    ("headers", "version"), [({"x-model-label": "canary"}, "2"), ({"x-model-label": "stable"}, "1")]
)
def test_label_in_a_header(protocol: Protocol, headers: dict[str, str], version: str) -> None:
    assert {served(protocol, headers) for _ in range(10)} == {version}


def test_label_in_a_parameter(protocol: Protocol) -> None:
    assert {served(protocol, parameters={"label": "canary"}) for _ in range(10)} == {"2"}


def test_version_in_the_request_wins_over_headers(protocol: Protocol) -> None:
    assert served(protocol, {"x-canary": "yes", "x-model-label": "canary"}, model_version="1") == "1"


@pytest.mark.parametrize(
    ("headers", "version"),
    [({"x-canary": "yes"}, "2"), ({"x-beta-tester": "anything"}, "1")],
    ids=["header equals a value -> version", "header present -> label"],
)
def test_canary_by_header(protocol: Protocol, headers: dict[str, str], version: str) -> None:
    assert {served(protocol, headers) for _ in range(10)} == {version}


def test_canary_value_must_match(protocol: Protocol) -> None:
    """x-canary: no is not the rule's value: the request falls through to the 50/50 split."""
    seen = Counter(served(protocol, {"x-canary": "no"}) for _ in range(60))
    assert set(seen) == {"1", "2"}


def test_sticky_split_keeps_a_user_on_one_version(protocol: Protocol) -> None:
    by_user = {
        user: {served(protocol, {"x-user-id": f"user-{user}"}) for _ in range(5)} for user in range(30)
    }
    assert all(len(versions) == 1 for versions in by_user.values())
    # Over 30 users, a 50/50 split puts some on each version (all on one: chance 2 in 2**30).
    assert {v for versions in by_user.values() for v in versions} == {"1", "2"}


def test_split_ratio_within_a_statistical_bound(http: httpx.Client) -> None:
    requests = 600
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    counts = Counter(
        http.post("/v2/models/routed/infer", json=body).json()["model_version"] for _ in range(requests)
    )
    # Binomial(600, 0.5): 5 standard deviations either side fail once in about 1.7 million runs.
    bound = 5 * math.sqrt(requests * 0.25)
    assert abs(counts["1"] - requests / 2) < bound, counts


def test_version_is_reported_in_a_header(http: httpx.Client) -> None:
    body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 1, 1, 1]}]}
    for _ in range(10):
        response = http.post("/v2/models/routed/infer", json=body)
        assert response.headers["X-Model-Version"] == response.json()["model_version"]


@pytest.mark.parametrize(
    ("rules", "problem"),
    [
        ("[{header: x-a, version: 5}]", "the canary rule on header x-a names version 5, which is not loaded"),
        ("[{header: x-b, label: nope}]", "the canary rule on header x-b names label 'nope'"),
        ("[{header: x-c, version: 1, label: stable}]", "a canary rule names one of version or label"),
    ],
)
def test_canary_rule_pointing_nowhere_is_a_config_problem(tmp_path: Path, rules: str, problem: str) -> None:
    (tmp_path / "m" / "1").mkdir(parents=True)
    (tmp_path / "m" / "1" / "model.onnx").write_bytes(b"")
    (tmp_path / "m" / "config.yaml").write_text(f"labels: {{stable: 1}}\nrouting: {{canary: {rules}}}\n")
    assert any(problem in p for p in scan_model(tmp_path, "m").problems)
