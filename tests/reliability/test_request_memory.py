"""Memory per request: the body limit follows how the body is parsed (JSON or binary), the largest
accepted body costs at most 4x itself in flight as JSON and 2x as binary, and a gateway-wide budget
of body bytes in flight answers 429 beyond it."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from gateway.tools.hostile import PeakRss
from scripts.build_models import _save
from tests.support import RunningGateway, start_gateway
from tests.support.model_builders import build_row_sum

MIB = 2**20
JSON_LIMIT_MB = 24
BINARY_LIMIT_MB = 48


@pytest.fixture(scope="module")
def mlp_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model, `mlp`, that sums each row of 64: its work and its answer are small beside a
    large body, so the memory measured is the gateway's."""
    repo = tmp_path_factory.mktemp("mlp_repo")
    _save(build_row_sum(), repo / "mlp" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def sized(mlp_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    env = {
        "MODELYARD_MAX_JSON_BODY_MB": str(JSON_LIMIT_MB),
        "MODELYARD_MAX_REQUEST_BODY_MB": str(BINARY_LIMIT_MB),
    }
    running = start_gateway(mlp_repo, tmp_path_factory.mktemp("sized") / "gateway.log", env=env)
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


def json_body(rows: int, seed: int = 7) -> bytes:
    """A request with short numbers (two decimals): the more numbers a byte of JSON holds, the
    more a parser that makes an object per number inflates it."""
    x = np.round(np.random.default_rng(seed).standard_normal((rows, 64)), 2)
    tensor = {"name": "input", "shape": [rows, 64], "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def binary_body(rows: int) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(7).standard_normal((rows, 64)).astype(np.float32)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [rows, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ]
        }
    ).encode()
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def largest_json_body(limit: int) -> bytes:
    rows = int(1000 * (limit - 4096) / len(json_body(1000)))
    body = json_body(rows)
    while len(body) > limit:
        rows = int(rows * 0.99)
        body = json_body(rows)
    return body


def peak_growth_per_request(
    gateway: RunningGateway, body: bytes, headers: dict[str, str], inflight: int
) -> tuple[float, list[int]]:
    """`inflight` requests with `body` at once: the peak RSS growth per request, as a multiple of
    the body."""
    url = f"{gateway.url}/v2/models/mlp/infer"
    barrier = threading.Barrier(inflight)
    codes: list[int] = []

    def one() -> None:
        with httpx.Client(timeout=300) as client:
            barrier.wait()
            codes.append(client.post(url, content=body, headers=headers).status_code)

    with PeakRss(gateway.process.pid, interval_s=0.002) as sampler:
        threads = [threading.Thread(target=one) for _ in range(inflight)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(600)
    return (sampler.peak - sampler.before) / inflight / len(body), codes


def test_the_body_limit_follows_how_the_body_is_parsed(sized: RunningGateway) -> None:
    over_json = json_body(1) + b" " * (JSON_LIMIT_MB * MIB)
    with httpx.Client(base_url=sized.url, timeout=120) as client:
        refused = client.post("/v2/models/mlp/infer", content=over_json)
        assert refused.status_code == 413, refused.text
        assert "MODELYARD_MAX_JSON_BODY_MB" in refused.json()["error"]
        predict = client.post(
            "/v1/models/mlp:predict", content=b'{"instances": [' + b" " * (JSON_LIMIT_MB * MIB) + b"]}"
        )
        assert predict.status_code == 413 and "MODELYARD_MAX_JSON_BODY_MB" in predict.json()["error"]
        # The same size as binary tensor data is under its own limit.
        body, headers = binary_body((JSON_LIMIT_MB + 2) * MIB // 256)
        assert len(body) > JSON_LIMIT_MB * MIB
        assert client.post("/v2/models/mlp/infer", content=body, headers=headers).status_code == 200
        # A binary request's JSON header is JSON: its own limit holds for it.
        header = b'{"inputs": []}' + b" " * (JSON_LIMIT_MB * MIB)
        mixed = client.post(
            "/v2/models/mlp/infer",
            content=header,
            headers={"Inference-Header-Content-Length": str(len(header))},
        )
        assert mixed.status_code == 413 and "MODELYARD_MAX_JSON_BODY_MB" in mixed.json()["error"]


@pytest.mark.parametrize("inflight", [1, 3])
def test_the_largest_json_body_costs_at_most_4x_itself_in_flight(
    sized: RunningGateway, inflight: int
) -> None:
    body = largest_json_body(JSON_LIMIT_MB * MIB)
    assert len(body) > (JSON_LIMIT_MB - 1) * MIB
    ratio, codes = peak_growth_per_request(sized, body, {"Content-Type": "application/json"}, inflight)
    assert codes == [200] * inflight
    assert ratio <= 4.0, f"peak RSS growth per in-flight JSON request: {ratio:.2f}x its body"


@pytest.mark.parametrize("inflight", [1, 3])
def test_the_largest_binary_body_costs_at_most_2x_itself_in_flight(
    sized: RunningGateway, inflight: int
) -> None:
    body, headers = binary_body((BINARY_LIMIT_MB * MIB - 4096) // 256)
    ratio, codes = peak_growth_per_request(sized, body, headers, inflight)
    assert codes == [200] * inflight
    assert ratio <= 2.0, f"peak RSS growth per in-flight binary request: {ratio:.2f}x its body"


@pytest.fixture(scope="module")
def budgeted(mlp_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    env = {"MODELYARD_MAX_INFLIGHT_BODY_MB": "2"}
    running = start_gateway(mlp_repo, tmp_path_factory.mktemp("budgeted") / "gateway.log", env=env)
    yield running
    assert running.stop() == 0


def test_bodies_past_the_in_flight_budget_are_429(budgeted: RunningGateway) -> None:
    """Two bodies that fit the budget arrive slowly; a third that would pass it is 429 at once,
    before its body is read; once they are answered, there is room again."""
    declared = 900 * 1024
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [declared // 256, 64], "datatype": "FP32",
                     "parameters": {"binary_data_size": declared}}]}
    ).encode()  # fmt: skip
    slow = []
    for _ in range(2):
        sock = socket.create_connection(("127.0.0.1", budgeted.http_port), timeout=30)
        sock.sendall(
            b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            + f"Inference-Header-Content-Length: {len(header)}\r\n".encode()
            + f"Content-Length: {len(header) + declared}\r\n\r\n".encode()
            + header
        )
        slow.append(sock)
    try:
        time.sleep(0.5)
        with httpx.Client(base_url=budgeted.url, timeout=60) as client:
            third, headers = binary_body(2 * 1024)  # 512 KiB of tensor data
            refused = client.post("/v2/models/mlp/infer", content=third, headers=headers)
            assert refused.status_code == 429, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert "MODELYARD_MAX_INFLIGHT_BODY_MB" in refused.json()["error"]
            # A small one still fits beside them.
            assert client.post("/v2/models/mlp/infer", content=json_body(1)).status_code == 200
            for sock in slow:
                sock.close()
            slow.clear()
            time.sleep(0.5)
            assert client.post("/v2/models/mlp/infer", content=third, headers=headers).status_code == 200
    finally:
        for sock in slow:
            sock.close()


def test_a_chunked_body_past_the_in_flight_budget_is_429_as_it_arrives(budgeted: RunningGateway) -> None:
    """No Content-Length to refuse it by: the budget is taken as the chunks arrive, the body is
    refused once it would pass it, and all of it is given back."""
    header = json.dumps(
        {"inputs": [{"name": "input", "shape": [3 * 4096, 64], "datatype": "FP32",
                     "parameters": {"binary_data_size": 3 * 2**20}}]}
    ).encode()  # fmt: skip

    def chunks() -> Iterator[bytes]:
        yield header
        for _ in range(48):
            yield bytes(64 * 1024)

    with httpx.Client(base_url=budgeted.url, timeout=60) as client:
        headers = {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(header)),
        }
        refused = client.post("/v2/models/mlp/infer", content=chunks(), headers=headers)
        assert refused.status_code == 429, refused.text
        assert "MODELYARD_MAX_INFLIGHT_BODY_MB" in refused.json()["error"]
        # Given back: a body of 1.5 MiB, three quarters of the budget, fits again.
        body, body_headers = binary_body(6 * 1024)
        assert client.post("/v2/models/mlp/infer", content=body, headers=body_headers).status_code == 200
