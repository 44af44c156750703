"""A real, managed TorchServe killed in the middle of steady load: its model answers 503 fast
(never hangs, never 500), the ONNX model beside it serves on with zero errors, and the
TorchServe model comes back by itself. Starts its own TorchServe: marked slow."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import psutil
import pytest

from scripts import build_models
from tests.reliability.load import SteadyLoad
from tests.support import RunningGateway, start_gateway, torchserve_missing

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torchserve_missing() is not None, reason=str(torchserve_missing())),
]

ROWS = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": ROWS.ravel().tolist()}]}


@pytest.fixture(scope="module")
def ts_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningGateway, Path]]:
    from scripts import build_torch_models

    repo = tmp_path_factory.mktemp("kill_repo")
    build_torch_models.build_repository(repo)
    build_models._save(build_models.build_mlp(), repo / "mlp" / "1" / "model.onnx")
    running = start_gateway(repo, tmp_path_factory.mktemp("kill_logs") / "gateway.log")
    yield running, repo
    running.stop()


def test_torchserve_killed_mid_load(ts_gateway: tuple[RunningGateway, Path]) -> None:
    gateway, repo = ts_gateway
    want = ort.InferenceSession(str(repo / "mlp" / "1" / "model.onnx")).run(None, {"input": ROWS})[0]

    def matches(answer: dict[str, object]) -> bool:
        (output,) = answer["outputs"]  # type: ignore[misc]
        got = np.asarray(output["data"], np.float32).reshape(output["shape"])
        return bool(np.allclose(got, want, rtol=1e-4, atol=1e-5))

    onnx_load = SteadyLoad(f"{gateway.url}/v2/models/mlp/infer", body=BODY, check=matches, clients=2)
    torch_load = SteadyLoad(
        f"{gateway.url}/v2/models/mlp_torch/versions/1/infer", body=BODY, check=matches, clients=2
    )
    with onnx_load, torch_load:
        time.sleep(1.0)
        (java,) = [
            p for p in psutil.Process(gateway.process.pid).children(recursive=True) if p.name() == "java"
        ]
        killed = time.monotonic()
        java.kill()
        deadline = killed + 180
        while not any(o.status == 200 and o.started > killed + 0.5 for o in list(torch_load.outcomes)):
            assert time.monotonic() < deadline, gateway.output()[-3000:]
            time.sleep(0.2)
        recovered_s = time.monotonic() - killed
    assert set(onnx_load.counts()) == {200} and onnx_load.wrong_answers() == 0, onnx_load.counts()
    outage = [o for o in torch_load.outcomes if o.status != 200]
    assert outage and {o.status for o in outage} <= {503}, torch_load.counts()
    # Fast: a refused request waits on nothing (a request cut off by the kill may take longer).
    assert np.median([o.ended - o.started for o in outage]) < 0.5
    assert torch_load.wrong_answers() == 0
    assert recovered_s < 180
