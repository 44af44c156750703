"""The `modelyard` command: `serve` from flags or MODELYARD_* variables, and `repo check`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.support import ROOT, free_port, start_gateway


def modelyard() -> str:
    script = Path(sys.executable).parent / "modelyard"
    assert script.exists(), "the console script is installed with the package"
    return str(script)


def test_repo_check_passes_on_the_example_repository() -> None:
    result = subprocess.run(
        [modelyard(), "repo", "check", str(ROOT / "model_repo")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok    model 'affine': versions 1, 2 (onnxruntime), loaded" in result.stdout


def test_repo_check_names_every_problem(test_repo: Path) -> None:
    result = subprocess.run([modelyard(), "repo", "check", str(test_repo)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "FAIL  model 'broken_artifact' version 1: onnxruntime cannot load" in result.stdout
    assert "broken_config/config.yaml: unknown key 'labelz' (did you mean 'labels'?)" in result.stdout
    assert "FAIL  model 'primary_broken' version 1: onnxruntime cannot load" in result.stdout
    assert "3 problem(s) found" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_repo_check_without_loading_finds_a_typo_inside_a_backend_section(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "model_repo" / "affine", tmp_path / "affine")
    shutil.copytree(ROOT / "model_repo" / "affine_tf", tmp_path / "affine_tf")
    config = tmp_path / "affine_tf" / "config.yaml"
    config.write_text(config.read_text().replace("intra_op_threads: 1", "intra_op_thread: 1"))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "repo", "check", "--no-load", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        "FAIL  model 'affine_tf': invalid config.yaml section: tensorflow: "
        "unknown key 'intra_op_thread' (did you mean 'intra_op_threads'?)" in result.stdout
    )
    assert "ok    model 'affine': versions 1, 2 (onnxruntime)" in result.stdout
    assert "1 problem(s) found" in result.stderr


def test_repo_check_of_a_missing_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [modelyard(), "repo", "check", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "is not a folder" in result.stderr


def test_serve_reads_modelyard_environment_variables(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    env = {
        **os.environ,
        "MODELYARD_MODEL_REPO": str(ROOT / "model_repo"),
        "MODELYARD_HTTP_PORT": str(http_port),
        "MODELYARD_GRPC_PORT": str(grpc_port),
    }
    process = subprocess.Popen(
        [modelyard(), "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{http_port}/v2/health/ready").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        import tritonclient.grpc as triton_grpc

        assert triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}").is_model_ready("mlp")
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
    assert process.returncode == 0, output
    assert "modelyard stopped" in output


def test_a_broken_model_does_not_stop_the_others(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repo" / "mlp", repo / "mlp")
    (repo / "bad" / "1").mkdir(parents=True)
    (repo / "bad" / "1" / "model.onnx").write_bytes(b"\x00garbage")
    gateway = start_gateway(repo, tmp_path / "log.txt")
    try:
        assert httpx.get(f"{gateway.url}/v2/models/mlp/ready").status_code == 200
        assert httpx.get(f"{gateway.url}/v2/models/bad/ready").status_code == 503
    finally:
        assert gateway.stop() == 0
    assert "cannot load model 'bad' version 1" in gateway.output()


def test_serve_refuses_a_missing_repository(tmp_path: Path) -> None:
    result = subprocess.run(
        [modelyard(), "serve", "--model-repo", str(tmp_path / "nope"), "--http-port", str(free_port()), "--grpc-port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert "is not a folder" in result.stdout + result.stderr
