"""A gateway with only the extras its models need serves them: LiteRT and `backend: v2` need no
TensorFlow, and a TensorFlow model beside them says what to install while the rest serves."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from tests.support import ROOT, RunningGateway, start_gateway
from tests.support.model_builders import v2_config

X = np.random.default_rng(42).standard_normal((5, 4)).astype(np.float32)
# Packages a LiteRT-only or ONNX-only install lacks: the keras and tensorflow extras.
ABSENT = ("tensorflow", "tensorflow_serving", "keras")


def unimportable(shim: Path, module: str) -> None:
    """A package ahead of site-packages that fails to import the way a missing one does."""
    (shim / module).mkdir(parents=True)
    (shim / module / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{module}'\")\n")


def affine(version: int, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(ROOT / "model_repo" / "affine" / str(version) / "model.onnx"))
    return session.run(None, {"x": x})[0]


def infer(client: object, module: object, model: str, version: str) -> np.ndarray:
    tensor = module.InferInput("x", list(X.shape), "FP32")  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(X)
    return client.infer(model, [tensor], model_version=version).as_numpy("y")  # type: ignore[attr-defined]


def test_litert_and_v2_serve_without_tensorflow(gateway: RunningGateway, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name in ("affine_litert", "affine_tf"):
        shutil.copytree(ROOT / "model_repo" / name, repo / name)
    for protocol, address in (("grpc", gateway.grpc), ("rest", gateway.url)):
        # No version folders: the versions come from v2.versions.
        (repo / f"remote_{protocol}").mkdir()
        (repo / f"remote_{protocol}" / "config.yaml").write_text(
            v2_config("affine", address, protocol, versions={1: "1", 2: "2"})
        )
    shim = tmp_path / "shim"
    for module in ABSENT:
        unimportable(shim, module)
    running = start_gateway(repo, tmp_path / "gateway.log", env={"PYTHONPATH": str(shim)})
    try:
        rest = triton_http.InferenceServerClient(running.http, network_timeout=60)
        grpc_client = triton_grpc.InferenceServerClient(running.grpc)
        for client, module in ((rest, triton_http), (grpc_client, triton_grpc)):
            for model in ("affine_litert", "remote_grpc", "remote_rest"):
                for version in (1, 2):
                    got = infer(client, module, model, str(version))
                    np.testing.assert_allclose(got, affine(version, X), rtol=1e-5, atol=1e-5, err_msg=model)
        rest.close()
        grpc_client.close()
        index = {row["name"]: row for row in httpx.post(f"{running.url}/v2/repository/index").json()}
        assert index["affine_tf"]["state"] == "UNAVAILABLE", index
        assert "pip install 'modelyard[tensorflow]'" in index["affine_tf"]["reason"], index
        assert all(index[m]["state"] == "READY" for m in ("affine_litert", "remote_grpc", "remote_rest"))
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        refused = httpx.post(f"{running.url}/v2/models/affine_tf/infer", json=body)
        assert refused.status_code == 503
        assert "modelyard[tensorflow]" in refused.json()["error"]
    finally:
        running.stop()
    assert "Traceback" not in running.output(), running.output()[-3000:]


def test_the_registry_imports_no_framework() -> None:
    """Listing the backends and their attributes costs no extra's import."""
    probe = (
        "import sys, adapters, gateway.repository\n"
        "assert len(adapters.BACKENDS) >= 7\n"
        "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'tensorflow', 'tensorflow_serving', 'keras', 'ai_edge_litert', 'torch', 'ts', 'model_archiver'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
