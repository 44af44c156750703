"""Peers benchmark: modelyard against MLServer and KServe on the same ONNX model, in one run.

Installs MLServer and KServe into their own venvs under benchmarks/peers/ (pinned, on demand),
serves model_repo/mlp/1/model.onnx from each with the minimal runtimes in benchmarks/peer_runtimes/,
and drives every target with the same load: Debian's `hey` for REST (JSON and binary), benchmarks/load.py
for gRPC and for the in-process onnxruntime limit. Then the same weights as TorchScript on a TorchServe
the gateway manages: TorchServe's own REST API called directly, and modelyard in front of it.
Servers run on CPU 0, the load generator on CPU 1. Writes a markdown table and JSON to
benchmarks/results/. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from peer_venvs import PEER_PACKAGE, PEERS_DIR, RUNTIMES_DIR, ensure_venv, installed_version, kserve_command
from tritonclient.grpc import service_pb2, service_pb2_grpc

from adapters.torchserve import modelyard_handler as wire

ROOT = Path(__file__).resolve().parent.parent
ONNX_MODEL = ROOT / "model_repo" / "mlp" / "1" / "model.onnx"
MODEL = "mlp"
TORCH_MODEL = "mlp_torch"  # model_repo/mlp_torch version 1: mlp's weights as TorchScript
TORCH_VERSION = "1"
BATCH_ROW = 8  # the batch-8 row's rows per request, at concurrency 8
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SEED = 20240601
RTOL = 1e-4
ATOL = 1e-5
# Bounded waits: a server that is not ready in this time is reported, not waited on forever.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
# hey's summary prints latencies in seconds with 4 decimals, so percentiles have 0.1 ms resolution.
HEY = "hey"
H2LOAD = "h2load"  # Debian's nghttp2-client: a compiled HTTP/2 load generator, here sending gRPC frames
GRPC_SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Payload:
    """A request body for hey: the file, its content type, and any extra headers."""

    file: Path
    content_type: str
    headers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Payloads:
    json: Payload
    binary: Payload
    torchserve: Payload


@dataclass(frozen=True)
class Row:
    target: str
    protocol: str
    generator: str
    concurrency: int
    req_per_s: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    check: str
    batch: int = 1


@dataclass(frozen=True)
class Endpoint:
    """One running server: where its v2 REST infer lives, and its gRPC port when it has one."""

    name: str
    http: str
    grpc: str | None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds discarded before each row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.md")
    parser.add_argument(
        "--skip", default="", help="comma-separated targets to leave out: mlserver,kserve,torchserve"
    )
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.warmup < 0:
        parser.error("concurrency levels must be >= 1, duration > 0, warmup >= 0")
    args.skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    return args


# --- processes, ports, pinning ---------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int, command: list[str]) -> list[str]:
    """Prefix `taskset -c cpu` when the machine has a second CPU to keep server and load apart."""
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(cpu), *command]
    return command


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def server(name: str, command: list[str], ready_url: str, cwd: Path, env: dict[str, str]) -> Iterator[Path]:
    """Run `command` in its own process group until the block ends; it must answer `ready_url` first.

    Yields the path of the server's log."""
    log = tempfile.NamedTemporaryFile(prefix=f"peers-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not http_ok(ready_url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = Path(log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} did not become ready at {ready_url}:\n{tail}")
            time.sleep(0.2)
        print(f"{name}: ready", file=sys.stderr)
        yield Path(log.name)
    finally:
        stop(proc)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group (servers fork workers), SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# --- peer venvs and runtimes -------------------------------------------------------------------


def mlserver_dir(work: Path, http_port: int, grpc_port: int) -> Path:
    """MLServer's settings and model-settings next to the runtime module, as `mlserver start` expects."""
    folder = work / "mlserver"
    folder.mkdir()
    shutil.copy(RUNTIMES_DIR / "mlserver_runtime.py", folder / "mlserver_runtime.py")
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "debug": False,
    }
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_runtime.OnnxRuntime",
        "parameters": {"uri": str(ONNX_MODEL), "version": "1"},
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    return folder


# --- the workload and its check ----------------------------------------------------------------


def make_input(rows: int = 1) -> np.ndarray:
    return np.random.default_rng(INPUT_SEED).standard_normal((rows, 64)).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ONNX_MODEL), options, providers=["CPUExecutionProvider"])
    output: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return output


def v2_body(x: np.ndarray) -> bytes:
    tensor = {"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def v2_binary_body(x: np.ndarray) -> tuple[bytes, int]:
    """A v2 request with Triton's binary extension both ways, and its JSON header's length."""
    header = {
        "inputs": [
            {
                "name": INPUT_NAME,
                "shape": list(x.shape),
                "datatype": "FP32",
                "parameters": {"binary_data_size": x.nbytes},
            }
        ],
        "outputs": [{"name": OUTPUT_NAME, "parameters": {"binary_data": True}}],
    }
    encoded = json.dumps(header).encode()
    return encoded + x.astype("<f4").tobytes(), len(encoded)


def post(url: str, payload: Payload) -> tuple[bytes, dict[str, str]]:
    headers = {"Content-Type": payload.content_type}
    headers.update(h.split(": ", 1) for h in payload.headers)  # type: ignore[arg-type]
    request = urllib.request.Request(url, data=payload.file.read_bytes(), headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), {k.lower(): v for k, v in response.headers.items()}


def compare(got: np.ndarray, expected: np.ndarray) -> str:
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        return f"failed: output differs from onnxruntime (shape {list(got.shape)})"
    return "ok"


def check_v2_binary(url: str, payload: Payload, expected: np.ndarray) -> str:
    """One binary-extension request before timing: 'ok', or why the answer is not onnxruntime's."""
    try:
        body, headers = post(url, payload)
        length = int(headers["inference-header-content-length"])
    except (urllib.error.URLError, OSError, ValueError, KeyError) as exc:
        return f"failed: {exc}"
    header = json.loads(body[:length])
    output = header["outputs"][0]
    got = np.frombuffer(body[length:], dtype="<f4").reshape(output["shape"])
    return compare(got, expected)


def check_torchserve(url: str, payload: Payload, expected: np.ndarray) -> str:
    """One request to TorchServe's /predictions in modelyard's tensor format, checked the same way."""
    try:
        body, _ = post(url, payload)
        _, outputs = wire.decode(body, "outputs")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"failed: {exc}"
    if OUTPUT_NAME not in outputs:
        return f"failed: no output {OUTPUT_NAME!r} in {sorted(outputs)}"
    return compare(outputs[OUTPUT_NAME], expected)


def check_rest(url: str, body: bytes, expected: np.ndarray) -> str:
    """One v2 JSON request before timing: 'ok', or why the answer is not onnxruntime's."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"failed: {exc}"
    outputs = {output.get("name"): output for output in answer.get("outputs", [])}
    if OUTPUT_NAME not in outputs:
        return f"failed: no output {OUTPUT_NAME!r} in {sorted(outputs)}"
    output = outputs[OUTPUT_NAME]
    got = np.asarray(output["data"], dtype=np.float32).reshape(output["shape"])
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        return f"failed: output differs from onnxruntime (shape {list(got.shape)})"
    return "ok"


# --- load generators ---------------------------------------------------------------------------


def run_hey(url: str, concurrency: int, seconds: float, payload: Payload | None) -> str:
    command = [HEY, "-z", f"{seconds:g}s", "-c", str(concurrency), "-cpus", "1", "-t", "30"]
    if payload is not None:
        command += ["-m", "POST", "-T", payload.content_type, "-D", str(payload.file)]
        for header in payload.headers:
            command += ["-H", header]
    result = subprocess.run(
        pinned(1, [*command, url]), capture_output=True, text=True, timeout=seconds + 120, check=True
    )
    return result.stdout


def parse_hey(summary: str) -> tuple[int, int, float, float, float]:
    """(ok, errors, total seconds, p50 ms, p99 ms) from hey's text summary."""
    total_match = re.search(r"Total:\s+([\d.]+) secs", summary)
    total = float(total_match.group(1)) if total_match else math.nan
    codes = {int(code): int(count) for code, count in re.findall(r"\[(\d+)\]\s+(\d+) responses", summary)}
    error_block = summary.split("Error distribution:", 1)[1] if "Error distribution:" in summary else ""
    transport_errors = sum(int(count) for count in re.findall(r"\[(\d+)\]", error_block))
    ok = codes.get(200, 0)
    errors = sum(count for code, count in codes.items() if code != 200) + transport_errors
    percentiles = dict(re.findall(r"(\d+)%+ in ([\d.]+) secs", summary))
    p50 = float(percentiles["50"]) * 1000 if "50" in percentiles else math.nan
    p99 = float(percentiles["99"]) * 1000 if "99" in percentiles else math.nan
    return ok, errors, total, p50, p99


def hey_row(
    target: str,
    protocol: str,
    url: str,
    concurrency: int,
    args: argparse.Namespace,
    body: Payload | None,
    check: str,
) -> Row | None:
    """One REST row from hey; without hey, v2 JSON rows come from load.py's rest-json mode, others
    are left out."""
    if shutil.which(HEY) is None:
        if body is None or protocol != "REST JSON":
            return None
        host_port = urllib.parse.urlsplit(url).netloc
        row = load_py_row(target, "rest-json", concurrency, args, Endpoint(target, host_port, None))
        return replace(row, protocol=protocol)
    if args.warmup > 0:
        run_hey(url, concurrency, args.warmup, body)
    ok, errors, total, p50, p99 = parse_hey(run_hey(url, concurrency, args.duration, body))
    rate = ok / total if total and total > 0 else math.nan
    print(f"{target} {protocol} c={concurrency}: {rate:.0f} req/s", file=sys.stderr)
    return Row(target, protocol, "hey", concurrency, rate, p50, p99, ok + errors, errors, check)


def load_py_row(
    target: str,
    mode: str,
    concurrency: int,
    args: argparse.Namespace,
    endpoint: Endpoint | None,
    model: str = MODEL,
    version: str = "",
    batch: int = 1,
) -> Row:
    """One row from benchmarks/load.py (gRPC, the in-process limit, or REST without hey).

    load.py checks every 10th answer against onnxruntime itself."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--modes", mode]
        command += ["--onnx", str(ONNX_MODEL), "--model", model, "--concurrency", str(concurrency)]
        command += ["--version", version, "--batch", str(batch)]
        command += [
            "--duration",
            f"{args.duration:g}",
            "--warmup",
            f"{args.warmup:g}",
            "--json-out",
            str(out),
        ]
        if endpoint is not None:
            command += ["--http", endpoint.http]
            command += ["--grpc", endpoint.grpc] if endpoint.grpc else []
        # The in-process limit stands in for a server, so it gets the server's CPU.
        cpu = 0 if mode == "inprocess" else 1
        subprocess.run(
            pinned(cpu, command),
            cwd=ROOT,
            check=True,
            timeout=args.warmup + args.duration + 120,
            stdout=subprocess.DEVNULL,
        )
        row = json.loads(out.read_text())["rows"][0]
    nan = math.nan
    print(f"{target} {mode} c={concurrency}: {row['req_per_s']:.0f} req/s", file=sys.stderr)
    return Row(
        target,
        {"inprocess": "in-process", "grpc": "gRPC"}.get(mode, mode),
        "load.py",
        concurrency,
        row["req_per_s"],
        nan if row["p50_ms"] is None else row["p50_ms"],
        nan if row["p99_ms"] is None else row["p99_ms"],
        row["requests"],
        row["errors"],
        "every 10th",
        batch,
    )


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message on the wire: a flag byte, a big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_infer_request(model: str, version: str, x: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    tensor = request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(x.shape))
    del tensor  # raw contents carry the data, in input order
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request.SerializeToString()


def check_grpc(address: str, request: bytes, expected: np.ndarray) -> tuple[str, int]:
    """One ModelInfer before timing: ('ok' or why not, the size of the answer's gRPC frame)."""
    channel = grpc.insecure_channel(address)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(service_pb2.ModelInferRequest.FromString(request), timeout=30)
    except grpc.RpcError as exc:
        return f"failed: {exc.code().name}: {exc.details()}", 0
    finally:
        channel.close()
    outputs = [o.name for o in response.outputs]
    if OUTPUT_NAME not in outputs or len(response.raw_output_contents) != len(outputs):
        return f"failed: no raw output {OUTPUT_NAME!r} in {outputs}", 0
    index = outputs.index(OUTPUT_NAME)
    shape = list(response.outputs[index].shape)
    got = np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(shape)
    return compare(got, expected), len(grpc_frame(response.SerializeToString()))


def grpc_row(
    target: str,
    endpoint: Endpoint,
    concurrency: int,
    args: argparse.Namespace,
    work: Path,
    model: str = MODEL,
    version: str = "",
    batch: int = 1,
) -> Row:
    """One gRPC ModelInfer row from h2load; from load.py where h2load is missing.

    h2load cannot read gRPC trailers, so a request counts as answered only if the answers' DATA
    bytes add up to one full, checked answer frame per request; any shortfall counts as errors."""
    assert endpoint.grpc is not None
    if shutil.which(H2LOAD) is None:
        return load_py_row(target, "grpc", concurrency, args, endpoint, model, version, batch)
    x = make_input(batch)
    request = grpc_infer_request(model, version, x)
    check, frame_size = check_grpc(endpoint.grpc, request, reference(x))
    body = work / f"grpc-{model}-{version or 'default'}-{batch}.bin"
    body.write_bytes(grpc_frame(request))
    url = f"http://{endpoint.grpc}/{GRPC_SERVICE}/ModelInfer"
    row = h2load_row(target, url, concurrency, args, body, frame_size, work)
    return replace(row, check=check, batch=batch)


def h2load_row(
    target: str, url: str, concurrency: int, args: argparse.Namespace, body: Path, frame_size: int, work: Path
) -> Row:
    """A gRPC row from h2load: one connection per client, one stream at a time on each."""
    command = [H2LOAD, "-c", str(concurrency), "-m", "1", "-d", str(body)]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    if args.warmup > 0:
        subprocess.run(
            pinned(1, [*command, "-D", f"{round(args.warmup * 1000)}ms", url]),
            capture_output=True,
            timeout=args.warmup + 120,
            check=True,
        )
    log = work / "h2load.log"
    result = subprocess.run(
        pinned(1, [*command, "-D", f"{round(args.duration * 1000)}ms", "--log-file", str(log), url]),
        capture_output=True,
        text=True,
        timeout=args.duration + 120,
        check=True,
    )
    durations_us, statuses = [], []
    for line in log.read_text().splitlines():
        _, status, duration = line.split("\t")
        statuses.append(int(status))
        durations_us.append(int(duration))
    log.unlink()
    data = re.search(r"\((\d+)\) data", result.stdout)
    data_bytes = int(data.group(1)) if data else 0
    requests = len(durations_us)
    answered = min(requests, data_bytes // frame_size) if frame_size else 0
    errors = requests - answered + sum(1 for status in statuses if status != 200)
    ok = [d for d, status in zip(durations_us, statuses, strict=True) if status == 200]
    p50, p99 = (
        (float(np.percentile(ok, 50)) / 1000, float(np.percentile(ok, 99)) / 1000)
        if ok
        else (math.nan, math.nan)
    )
    rate = max(0, requests - errors) / args.duration
    print(f"{target} gRPC c={concurrency}: {rate:.0f} req/s", file=sys.stderr)
    return Row(target, "gRPC", "h2load", concurrency, rate, p50, p99, requests, errors, "-")


def present(row: Row | None) -> list[Row]:
    return [] if row is None else [row]


# --- targets -----------------------------------------------------------------------------------


def gateway_target(
    args: argparse.Namespace, payloads: Payloads, expected: np.ndarray, work: Path
) -> list[Row]:
    # A repository holding only mlp, so the gateway starts fast and serves exactly what the peers serve.
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repo" / "mlp", repo / MODEL)
    rows = []
    with gateway(repo, f"/v2/models/{MODEL}/ready") as (base, endpoint, _):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, payloads.json.file.read_bytes(), expected)
        check_binary = check_v2_binary(url, payloads.binary, expected)
        for level in args.levels:
            live = f"{base}/v2/health/live"
            rows += present(
                hey_row("hey ceiling (GET /v2/health/live)", "REST GET", live, level, args, None, "-")
            )
        if shutil.which(H2LOAD) and endpoint.grpc:
            live_body = work / "grpc-live.bin"
            live_body.write_bytes(grpc_frame(service_pb2.ServerLiveRequest().SerializeToString()))
            live_size = len(grpc_frame(service_pb2.ServerLiveResponse(live=True).SerializeToString()))
            live_url = f"http://{endpoint.grpc}/{GRPC_SERVICE}/ServerLive"
            for level in args.levels:
                row = h2load_row(
                    "h2load ceiling (ServerLive)", live_url, level, args, live_body, live_size, work
                )
                rows.append(replace(row, protocol="gRPC no-op"))
        for level in args.levels:
            rows += present(hey_row("modelyard", "REST JSON", url, level, args, payloads.json, check))
        for level in args.levels:
            rows += present(
                hey_row("modelyard", "REST binary", url, level, args, payloads.binary, check_binary)
            )
        for level in args.levels:
            rows.append(grpc_row("modelyard", endpoint, level, args, work))
        rows.append(grpc_row("modelyard", endpoint, BATCH_ROW, args, work, batch=BATCH_ROW))
    return rows


@contextmanager
def gateway(repo: Path, ready_path: str) -> Iterator[tuple[str, Endpoint, Path]]:
    """`modelyard serve` on `repo`, pinned to the server CPU: (REST base URL, endpoint, its log)."""
    http_port, grpc_port = free_port(), free_port()
    command = [str(ROOT / ".venv" / "bin" / "modelyard"), "serve", "--model-repo", str(repo)]
    command += ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--log-level", "info"]
    base = f"http://127.0.0.1:{http_port}"
    endpoint = Endpoint("modelyard", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    with server("modelyard", pinned(0, command), f"{base}{ready_path}", ROOT, dict(os.environ)) as log:
        yield base, endpoint, log


# The second TorchServe pass: the gateway's own dynamic batching in front of TorchServe's, so that
# TorchServe's frontend and worker see one request per batch instead of one per client request.
GATEWAY_BATCHING = "batching: {max_batch_size: 8, max_queue_delay_us: 2000}"
# (direct target, gateway target, line added to mlp_torch's config.yaml) for each TorchServe pass.
TORCHSERVE_PASSES = (
    ("TorchServe direct", "modelyard -> TorchServe", ""),
    ("TorchServe direct (2nd start)", "modelyard+batching -> TorchServe", GATEWAY_BATCHING),
)


def torchserve_target(
    args: argparse.Namespace, payloads: Payloads, expected: np.ndarray, work: Path
) -> list[Row]:
    """mlp's weights as TorchScript on the TorchServe the gateway manages (it inherits the gateway's
    CPU pinning): TorchServe's REST API called directly, then modelyard in front of it; once as
    model_repo has it, once with the gateway's batching added. Each pass starts its own TorchServe,
    and its direct rows are the baseline for its gateway rows."""
    rows = []
    for direct_target, gateway_target_name, extra in TORCHSERVE_PASSES:
        repo = work / f"torch_repo_{len(rows)}"
        shutil.copytree(ROOT / "model_repo" / TORCH_MODEL, repo / TORCH_MODEL)
        if extra:
            config = repo / TORCH_MODEL / "config.yaml"
            config.write_text(config.read_text() + extra + "\n")
        rows += torchserve_pass(
            args, payloads, expected, work, repo, direct_target, gateway_target_name, extra
        )
    return rows


def torchserve_pass(
    args: argparse.Namespace,
    payloads: Payloads,
    expected: np.ndarray,
    work: Path,
    repo: Path,
    direct_target: str,
    gateway_target_name: str,
    extra: str,
) -> list[Row]:
    rows = []
    with gateway(repo, f"/v2/models/{TORCH_MODEL}/versions/{TORCH_VERSION}/ready") as (base, endpoint, log):
        found = re.search(r"managed TorchServe up \(pid \d+, inference port (\d+)\)", log.read_text())
        if found is None:
            raise RuntimeError("the gateway's log does not say which port its TorchServe listens on")
        direct = f"http://127.0.0.1:{found.group(1)}/predictions/{TORCH_MODEL}/{TORCH_VERSION}"
        check_direct = check_torchserve(direct, payloads.torchserve, expected)
        url = f"{base}/v2/models/{TORCH_MODEL}/versions/{TORCH_VERSION}/infer"
        check_json = check_rest(url, payloads.json.file.read_bytes(), expected)
        check_binary = check_v2_binary(url, payloads.binary, expected)
        for level in args.levels:
            rows += present(
                hey_row(direct_target, "REST tensors", direct, level, args, payloads.torchserve, check_direct)
            )
            rows += present(
                hey_row(gateway_target_name, "REST binary", url, level, args, payloads.binary, check_binary)
            )
            if not extra:  # the batching pass measures the binary and gRPC paths only
                rows += present(
                    hey_row(gateway_target_name, "REST JSON", url, level, args, payloads.json, check_json)
                )
            rows.append(
                replace(
                    grpc_row("modelyard", endpoint, level, args, work, TORCH_MODEL, TORCH_VERSION),
                    target=gateway_target_name,
                )
            )
    return rows


def mlserver_target(
    args: argparse.Namespace, payloads: Payloads, expected: np.ndarray, work: Path
) -> list[Row]:
    body = payloads.json
    venv = ensure_venv("mlserver")
    http_port, grpc_port = free_port(), free_port()
    folder = mlserver_dir(work, http_port, grpc_port)
    base = f"http://127.0.0.1:{http_port}"
    command = pinned(0, [str(venv / "bin" / "mlserver"), "start", str(folder)])
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    rows = []
    with server("mlserver", command, f"{base}/v2/models/{MODEL}/ready", folder, env):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, body.file.read_bytes(), expected)
        for level in args.levels:
            rows += present(hey_row("MLServer", "REST JSON", url, level, args, body, check))
        # MLServer answers raw_output_contents when the request sends raw_input_contents, so
        # load.py's gRPC mode (the one modelyard's gRPC rows use) drives it unchanged.
        endpoint = Endpoint("MLServer", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
        for level in args.levels:
            rows.append(grpc_row("MLServer", endpoint, level, args, work))
    return rows


def kserve_target(
    args: argparse.Namespace, payloads: Payloads, expected: np.ndarray, work: Path
) -> list[Row]:
    body = payloads.json
    venv = ensure_venv("kserve")
    http_port, grpc_port = free_port(), free_port()
    command = kserve_command(venv, ONNX_MODEL, MODEL, http_port, grpc_port)
    base = f"http://127.0.0.1:{http_port}"
    rows = []
    with server("kserve", pinned(0, command), f"{base}/v2/models/{MODEL}/ready", work, dict(os.environ)):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, body.file.read_bytes(), expected)
        for level in args.levels:
            rows += present(hey_row("KServe", "REST JSON", url, level, args, body, check))
    return rows


# --- report ------------------------------------------------------------------------------------


def ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}"


def fmt(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def goals(rows: list[Row]) -> list[str]:
    """Issue 6's concurrency-8 goal against each peer, per protocol: 2x req/s, at most half the p99."""
    lines = []
    for protocol in ("REST JSON", "gRPC"):
        ours = find(rows, "modelyard", protocol, 8)
        for peer in ("MLServer", "KServe"):
            theirs = find(rows, peer, protocol, 8)
            if ours is None or theirs is None:
                continue
            speedup = ours.req_per_s / theirs.req_per_s if theirs.req_per_s else math.nan
            p99_share = ours.p99_ms / theirs.p99_ms if theirs.p99_ms else math.nan
            verdict = "met" if speedup >= 2 and p99_share <= 0.5 else "NOT met"
            lines.append(
                f"- {protocol}, concurrency 8, vs {peer}: {speedup:.2f}x req/s (goal >= 2x), "
                f"p99 {p99_share:.2f} of theirs (goal <= 0.5): {verdict}"
            )
    limit = find(rows, "onnxruntime", "in-process", 1)
    for protocol, allowed in (("gRPC", 0.3), ("REST binary", 0.5)):
        ours = find(rows, "modelyard", protocol, 1)
        if limit is None or ours is None:
            continue
        added = ours.p50_ms - limit.p50_ms
        verdict = "met" if added <= allowed else "NOT met"
        lines.append(
            f"- overhead at concurrency 1 over {protocol}: p50 {ours.p50_ms:.2f} ms vs in-process "
            f"{limit.p50_ms:.2f} ms, +{added:.2f} ms (goal <= +{allowed} ms): {verdict}"
        )
    for direct_target, gateway_target_name, extra in TORCHSERVE_PASSES:
        for row in rows:
            if row.target != direct_target:
                continue
            ours = find(rows, gateway_target_name, "REST binary", row.concurrency)
            if ours is None:
                continue
            verdict = (
                "met" if ours.req_per_s >= row.req_per_s and ours.p50_ms <= 1.1 * row.p50_ms else "NOT met"
            )
            lines.append(
                f"- in front of TorchServe{' with `' + extra + '`' if extra else ''}, concurrency "
                f"{row.concurrency}, REST binary vs TorchServe's REST (same start): "
                f"{ratio(ours.req_per_s, row.req_per_s)}x req/s (goal >= 1), p50 {ours.p50_ms:.2f} vs "
                f"{row.p50_ms:.2f} ms (goal within 10%): {verdict}"
            )
    return lines


def find(rows: list[Row], target: str | None, protocol: str, concurrency: int, batch: int = 1) -> Row | None:
    return next(
        (
            r
            for r in rows
            if (target is None or r.target == target)
            and r.protocol == protocol
            and r.concurrency == concurrency
            and r.batch == batch
        ),
        None,
    )


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# modelyard vs MLServer vs KServe vs TorchServe: `mlp` (64->256->256->10, FP32)",
        "",
        f"- Run: {meta['date']}, command `{meta['command']}`",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores (a VM: the load "
        "average below says what else ran; compare rows only within this run)",
        f"- Load average (1, 5, 15 min) before: {meta['load_before']}, after: {meta['load_after']}",
        f"- Pinning: {meta['pinning']}",
        f"- {meta['duration']:g} s measured per row after {meta['warmup']:g} s warm-up; REST load from "
        f"`hey` ({meta['hey']}), the same body every request (v2 JSON, v2 binary, or TorchServe tensors); gRPC from "
        "h2load (benchmarks/load.py where h2load is missing); in-process from benchmarks/load.py",
        f"- Versions: Python {meta['python']}, onnxruntime {meta['onnxruntime']} (all servers), "
        f"MLServer {meta.get('mlserver', '-')} (default settings: parallel_workers 1), "
        f"KServe {meta.get('kserve', '-')} (one worker; REST only: its gRPC server binds every "
        "interface and this suite binds loopback only), "
        f"TorchServe {meta['torchserve']} with torch {meta['torch']} (the gateway's managed one: "
        "1 worker, TorchServe batching up to 8 with 2 ms delay, as model_repo/mlp_torch/config.yaml; "
        f"the `modelyard+batching` rows add `{GATEWAY_BATCHING}` to that config, on a second TorchServe start)",
        "- check: one REST request per target before timing compared with onnxruntime (np.allclose, "
        "rtol 1e-4, atol 1e-5); load.py rows compare every 10th answer. errors: non-200 answers, "
        "transport errors, mismatches. hey reports latency with 0.1 ms resolution.",
        "",
        "| target | protocol | generator | batch | concurrency | req/s | p50 ms | p99 ms | requests | errors | "
        "vs MLServer req/s (same protocol) | vs in-process req/s | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        # MLServer on the same protocol: the comparison issue 6 asks for.
        peer = find(rows, "MLServer", row.protocol, row.concurrency, row.batch)
        limit = find(rows, None, "in-process", row.concurrency, row.batch)
        mlserver = peer.req_per_s if peer else None
        inproc = limit.req_per_s if limit else None
        lines.append(
            f"| {row.target} | {row.protocol} | {row.generator} | {row.batch} | {row.concurrency} | "
            f"{fmt(row.req_per_s, 0)} | "
            f"{fmt(row.p50_ms)} | {fmt(row.p99_ms)} | {row.requests} | {row.errors} | "
            f"{ratio(row.req_per_s, mlserver)} | {ratio(row.req_per_s, inproc)} | {row.check} |"
        )
    goal_lines = goals(rows)
    if goal_lines:
        lines += ["", "Issue 6 goals measured here:", "", *goal_lines]
    if meta.get("failures"):
        lines += ["", "Targets that did not run:", "", *[f"- {failure}" for failure in meta["failures"]]]
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def hey_version() -> str:
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "hey"], capture_output=True, text=True, timeout=30
    )
    return f"Debian package {result.stdout.strip()}" if result.returncode == 0 else "version unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_payloads(work: Path, x: np.ndarray) -> Payloads:
    json_file, binary_file, tensors_file = work / "body.json", work / "body.bin", work / "body.tensors"
    json_file.write_bytes(v2_body(x))
    binary, header_length = v2_binary_body(x)
    binary_file.write_bytes(binary)
    tensors_file.write_bytes(wire.encode_tensors("inputs", {INPUT_NAME: x}, {"outputs": [OUTPUT_NAME]}))
    return Payloads(
        Payload(json_file, "application/json"),
        Payload(
            binary_file, "application/octet-stream", (f"Inference-Header-Content-Length: {header_length}",)
        ),
        Payload(tensors_file, wire.CONTENT_TYPE),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if shutil.which(HEY) is None:
        print("hey is missing (apt-get install -y hey): REST rows fall back to load.py", file=sys.stderr)
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(
            [
                os.path.relpath(sys.executable, ROOT),
                "benchmarks/peers.py",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_before": load_average(),
        "pinning": "servers on CPU 0, load generator on CPU 1 (taskset)"
        if pinned(0, [])
        else "none (taskset or a second CPU missing)",
        "duration": args.duration,
        "warmup": args.warmup,
        "hey": hey_version() if shutil.which(HEY) else "MISSING: REST rows from load.py rest-json instead",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "torchserve": package_version("torchserve"),
        "torch": package_version("torch"),
        "failures": [],
    }
    x = make_input()
    expected = reference(x)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="modelyard-peers-") as tmp:
        work = Path(tmp)
        payloads = write_payloads(work, x)
        rows += [load_py_row("onnxruntime", "inprocess", level, args, None) for level in args.levels]
        rows.append(load_py_row("onnxruntime", "inprocess", BATCH_ROW, args, None, batch=BATCH_ROW))
        rows += gateway_target(args, payloads, expected, work)
        targets = (
            ("mlserver", mlserver_target),
            ("kserve", kserve_target),
            ("torchserve", torchserve_target),
        )
        for name, target in targets:
            if name in args.skipped:
                continue
            # A peer that fails to install or start is reported under the table; the others still run.
            try:
                rows += target(args, payloads, expected, work)
                if name in PEER_PACKAGE:
                    meta[name] = installed_version(PEERS_DIR / name, PEER_PACKAGE[name])
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                meta["failures"].append(f"{name}: {str(exc)[:500]}")
    meta["load_after"] = load_average()
    text = render(rows, meta)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    # JSON has no NaN: a percentile without a successful request is written as null.
    records = [
        {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(row).items()}
        for row in rows
    ]
    payload = {"meta": meta, "rows": records}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
