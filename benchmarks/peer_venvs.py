"""The peers' own venvs under benchmarks/peers/: MLServer and KServe, pinned, made on first use.

Shared by the peers benchmark (benchmarks/peers.py) and by the tests that run a real KServe model
server as the remote of modelyard's v2 backend (tests/adapters/test_v2.py).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
PEERS_DIR = ROOT / "benchmarks" / "peers"
RUNTIMES_DIR = ROOT / "benchmarks" / "peer_runtimes"
KSERVE_SERVER = RUNTIMES_DIR / "kserve_server.py"
# onnxruntime is pinned to the gateway's own version so that every server runs the same engine.
# MLServer 1.7.1's inference workers call asyncio.get_event_loop() with no loop set, which uvloop
# 0.22+ refuses: its worker dies at start-up and the model never loads. uvloop < 0.22 still allows it.
PEER_PINS: dict[str, list[str]] = {
    "mlserver": ["mlserver==1.7.1", f"onnxruntime=={ort.__version__}", "uvloop<0.22"],
    "kserve": ["kserve==0.21.0", f"onnxruntime=={ort.__version__}"],
}
PEER_PACKAGE = {"mlserver": "mlserver", "kserve": "kserve"}


def venv_is_current(name: str) -> bool:
    stamp = PEERS_DIR / name / ".pins"
    return stamp.is_file() and stamp.read_text() == " ".join(PEER_PINS[name])


def ensure_venv(name: str, timeout_s: float = 1800) -> Path:
    """Create benchmarks/peers/<name> with its pinned packages unless the same pins are installed."""
    venv = PEERS_DIR / name
    if venv_is_current(name):
        return venv
    pins = " ".join(PEER_PINS[name])
    print(f"{name}: installing {pins} into {venv}", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, *PEER_PINS[name]], check=True, timeout=timeout_s)
    (venv / ".pins").write_text(pins)
    return venv


def installed_version(venv: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return result.stdout.strip()


def kserve_command(venv: Path, model: Path, name: str, http_port: int, grpc_port: int) -> list[str]:
    """KServe's Python model server serving one ONNX model on loopback, v2 REST and gRPC."""
    return [
        str(venv / "bin" / "python"),
        str(KSERVE_SERVER),
        str(model),
        name,
        str(http_port),
        str(grpc_port),
    ]
