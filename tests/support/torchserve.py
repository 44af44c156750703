"""TorchServe for the tests: whether it can run here, archives with modelyard's handler, and a
standalone TorchServe (what remote mode talks to)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from gateway.net import free_port


def torchserve_missing() -> str | None:
    """Why TorchServe cannot run here, or None when it can."""
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        return "TorchServe needs Java 17: no java on PATH"
    for module in ("ts", "model_archiver", "torch"):
        if importlib.util.find_spec(module) is None:
            return f"the torchserve extra is not installed (no module {module})"
    return None


def archive_for_torchserve(
    module_file: Path, name: str, inputs: list[str], outputs: list[str], store: Path
) -> Path:
    """A .mar with modelyard's handler, made with torch-model-archiver as a user preparing a remote TorchServe would."""
    import json

    from adapters.torchserve import modelyard_handler

    extra = store / f"{name}-settings" / modelyard_handler.SETTINGS_FILE
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_text(json.dumps({"inputs": inputs, "outputs": outputs, "threads": 1}))
    subprocess.run(
        [sys.executable, "-m", "model_archiver.model_packaging", "--model-name", name, "--version", "1",
         "--serialized-file", str(module_file), "--handler", modelyard_handler.__file__,
         "--extra-files", str(extra), "--export-path", str(store), "--force"],
        check=True, capture_output=True,
    )  # fmt: skip
    return store / f"{name}.mar"


class StandaloneTorchServe:
    """A TorchServe of its own, outside any gateway: what remote mode talks to."""

    def __init__(
        self, workdir: Path, models: dict[str, Path], token_auth: bool, ports: tuple[int, int] | None = None
    ) -> None:
        self.workdir = workdir
        self.inference_port, self.management_port = ports or (free_port(), free_port())
        self.token_auth = token_auth
        store = workdir / "store"
        store.mkdir(parents=True, exist_ok=True)
        config = workdir / "config.properties"
        config.write_text(
            f"inference_address=http://127.0.0.1:{self.inference_port}\n"
            f"management_address=http://127.0.0.1:{self.management_port}\n"
            f"metrics_address=http://127.0.0.1:{free_port()}\n"
            f"grpc_inference_port={free_port()}\ngrpc_management_port={free_port()}\n"
            "disable_system_metrics=true\ninstall_py_dep_per_model=false\n"
        )
        (workdir / "tmp").mkdir(exist_ok=True)
        command = [str(Path(sys.executable).with_name("torchserve")), "--start", "--foreground", "--ncs",
                   "--ts-config", str(config), "--model-store", str(store), "--enable-model-api",
                   "--models", *(f"{name}={path}" for name, path in models.items())]  # fmt: skip
        if not token_auth:
            command.append("--disable-token-auth")
        self.log = workdir / "torchserve.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                command, cwd=workdir, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TMPDIR": str(workdir / "tmp"), "LOG_LOCATION": str(workdir)},
            )  # fmt: skip

    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def keys(self) -> dict[str, str]:
        import json

        keys = json.loads((self.workdir / "key_file.json").read_text())
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}

    def wait_until_serving(self, model: str) -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"TorchServe exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                # TorchServe writes its key file a moment after it starts.
                headers = {"Authorization": f"Bearer {self.keys()['management']}"} if self.token_auth else {}
                answer = httpx.get(f"{self.management_url}/models/{model}", headers=headers, timeout=2)
                if answer.status_code == 200 and any(
                    w["status"] == "READY" for w in answer.json()[0]["workers"]
                ):
                    return
            except (httpx.HTTPError, FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        raise RuntimeError(
            f"TorchServe did not serve {model} in time:\n{self.log.read_text(errors='replace')[-3000:]}"
        )

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
