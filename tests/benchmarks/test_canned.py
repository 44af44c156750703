"""The peers bench's floor: benchmarks/canned.py answers a real tritonclient infer call with the
correct answer on both gRPC stacks, and its REST side beside it."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.support import ROOT, free_port

sys.path.insert(0, str(ROOT / "benchmarks"))

from canned import write_answers
from drive import make_input, reference


@pytest.fixture(params=["grpcio", "native"])
def canned(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, int, np.ndarray]]:
    x = make_input()
    expected = reference(x)
    write_answers(tmp_path, "mlp", "1", "logits", expected)
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "canned.py"), "--answers", str(tmp_path)]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port), "--grpc-server", request.param]
    log = tmp_path / "canned.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "canned.py did not become ready"
            time.sleep(0.1)
        yield http_port, grpc_port, x
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_the_canned_answer_is_the_model_answer_over_grpc_and_rest(
    canned: tuple[int, int, np.ndarray],
) -> None:
    http_port, grpc_port, x = canned
    expected = reference(x)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        result = client.infer("mlp", [tensor])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-6)
    finally:
        client.close()
    body = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
    }
    answer = httpx.post(f"http://127.0.0.1:{http_port}/v2/models/mlp/infer", json=body).json()
    np.testing.assert_allclose(
        np.array(answer["outputs"][0]["data"]).reshape(expected.shape), expected, rtol=1e-6
    )
