"""How the benchmarks measure a row: servers started and stopped, the load generators, and the
checks of each target's answer. Shared by peers.py, batching.py and ab.py.

REST and gRPC rows come from h2load (Debian's nghttp2-client; `--h1` for REST), which logs each
request's latency in microseconds. Where h2load is missing, REST rows fall back to hey (0.1 ms
resolution) and gRPC rows to benchmarks/load.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2, service_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
# This checkout's packages, whichever one the venv's editable install points at.
sys.path.insert(0, str(ROOT))

from adapters.torchserve import modelyard_handler as wire  # noqa: E402

ONNX_MODEL = ROOT / "model_repo" / "mlp" / "1" / "model.onnx"
MODEL = "mlp"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SEED = 20240601
RTOL = 1e-4
ATOL = 1e-5
# Bounded waits: a server that is not ready in this time is reported, not waited on forever.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
HEY = "hey"  # Debian's hey: the REST generator where h2load is missing; 0.1 ms latency resolution
H2LOAD = "h2load"  # Debian's nghttp2-client: compiled HTTP/1.1 and HTTP/2 load, per-request µs latencies
GRPC_SERVICE = "inference.GRPCInferenceService"


@dataclass(frozen=True)
class Payload:
    """A request body: the file, its content type, and any extra headers ("Name: value")."""

    file: Path
    content_type: str
    headers: tuple[str, ...] = ()


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
    model: str = MODEL
    mean_batch: float | None = None  # the rows per batch the gateway's batching formed, where it batched
    compute_ms: float | None = None  # the gateway's mean backend call per request, where measured


@dataclass(frozen=True)
class Endpoint:
    """One running server: where its REST API lives (host:port), and its gRPC port when it has one."""

    name: str
    http: str
    grpc: str | None


@dataclass(frozen=True)
class Running:
    """A server started by `server()`: its log file and its process id."""

    log: Path
    pid: int


# --- processes, ports, pinning ---------------------------------------------------------------


def stop_servers_on_sigterm() -> None:
    """A SIGTERM ends the run as an exception would, so `server()` stops what it started."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


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
def server(
    name: str, command: list[str], ready_url: str, cwd: Path, env: dict[str, str]
) -> Iterator[Running]:
    """Run `command` in its own process group until the block ends; it must answer `ready_url` first."""
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
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
        # taskset execs its command, so the pid is the server's own.
        yield Running(Path(log.name), proc.pid)
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


@contextmanager
def gateway(
    repo: Path,
    ready_path: str,
    source: Path = ROOT,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> Iterator[tuple[str, Endpoint, Running]]:
    """The gateway of `source` (a checkout) serving `repo`, pinned to the server CPU.

    `python -m gateway` from the checkout's root imports that checkout's code, whichever one the
    venv's editable install points at. Yields (REST base URL, endpoint, the running server)."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "gateway", "serve", "--model-repo", str(repo)]
    command += ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--log-level", "info", *extra]
    base = f"http://127.0.0.1:{http_port}"
    endpoint = Endpoint("modelyard", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    environment = {**os.environ, **(env or {})}
    with server("modelyard", pinned(0, command), f"{base}{ready_path}", source, environment) as running:
        yield base, endpoint, running


# --- the workload and its check ----------------------------------------------------------------


def make_input(rows: int = 1, features: int = 64, seed: int = INPUT_SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)


def reference(x: np.ndarray, model: Path = ONNX_MODEL) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
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


def binary_payload(file: Path, x: np.ndarray) -> Payload:
    """Writes x's binary-extension request to `file`."""
    body, header_length = v2_binary_body(x)
    file.write_bytes(body)
    return Payload(file, "application/octet-stream", (f"Inference-Header-Content-Length: {header_length}",))


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
    return compare(got, expected)


def grpc_frame(message: bytes) -> bytes:
    """One uncompressed gRPC message on the wire: a flag byte, a big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_infer_request(model: str, version: str, x: np.ndarray) -> bytes:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name=INPUT_NAME, datatype="FP32", shape=list(x.shape))
    # Raw contents carry the data, in input order.
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


# --- load generators ---------------------------------------------------------------------------


def h2load_row(
    target: str,
    protocol: str,
    url: str,
    concurrency: int,
    args: argparse.Namespace,
    body: Path | None,
    headers: tuple[str, ...],
    work: Path,
    *,
    h1: bool = False,
    frame_size: int | None = None,
) -> Row:
    """A row from h2load: one connection per client, one request at a time on each.

    A request counts as answered when its status is 200. For gRPC (`frame_size` given) that is not
    enough: h2load cannot read gRPC trailers, so the answers' DATA bytes must also add up to one
    full, checked answer frame per request, and any shortfall counts as errors."""
    command = [H2LOAD, "-c", str(concurrency), "-m", "1", *(["--h1"] if h1 else [])]
    command += ["-d", str(body)] if body is not None else []
    for header in headers:
        command += ["-H", header]
    if args.warmup > 0:
        subprocess.run(
            pinned(1, [*command, "-D", f"{round(args.warmup * 1000)}ms", url]),
            capture_output=True,
            timeout=args.warmup + 120,
            check=True,
        )
    log = work / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to its log file
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
    requests = len(durations_us)
    errors = sum(1 for status in statuses if status != 200)
    if frame_size is not None:
        data = re.search(r"\((\d+)\) data", result.stdout)
        data_bytes = int(data.group(1)) if data else 0
        answered = min(requests, data_bytes // frame_size) if frame_size else 0
        errors += requests - answered
    ok = [d for d, status in zip(durations_us, statuses, strict=True) if status == 200]
    p50, p99 = (
        (float(np.percentile(ok, 50)) / 1000, float(np.percentile(ok, 99)) / 1000)
        if ok
        else (math.nan, math.nan)
    )
    rate = max(0, requests - errors) / args.duration
    print(f"{target} {protocol} c={concurrency}: {rate:.0f} req/s", file=sys.stderr)
    return Row(target, protocol, "h2load", concurrency, rate, p50, p99, requests, errors, "-")


def rest_row(
    target: str,
    protocol: str,
    url: str,
    concurrency: int,
    args: argparse.Namespace,
    payload: Payload,
    check: str,
    work: Path,
    model: str = MODEL,
    generator: str = H2LOAD,
) -> Row | None:
    """One REST POST row: h2load --h1 (or hey when asked for), else hey, else (v2 JSON only)
    load.py; None when none can."""
    if generator == HEY or shutil.which(H2LOAD) is None:
        row = hey_row(target, protocol, url, concurrency, args, payload, check)
        return None if row is None else replace(row, model=model)
    headers = (f"Content-Type: {payload.content_type}", *payload.headers)
    row = h2load_row(target, protocol, url, concurrency, args, payload.file, headers, work, h1=True)
    return replace(row, check=check, model=model)


def grpc_row(
    target: str,
    endpoint: Endpoint,
    concurrency: int,
    args: argparse.Namespace,
    work: Path,
    model: str = MODEL,
    version: str = "",
    batch: int = 1,
    x: np.ndarray | None = None,
    expected: np.ndarray | None = None,
) -> Row:
    """One gRPC ModelInfer row from h2load (load.py where h2load is missing), its answer checked
    first. Without `x`, the input is mlp's fixed one with `batch` rows."""
    assert endpoint.grpc is not None
    if x is None:
        x = make_input(batch)
    if expected is None:
        expected = reference(x)
    if shutil.which(H2LOAD) is None:
        row = load_py_row(target, "grpc", concurrency, args, endpoint, model, version, batch)
        return replace(row, model=model)
    request = grpc_infer_request(model, version, x)
    check, frame_size = check_grpc(endpoint.grpc, request, expected)
    body = work / f"grpc-{model}-{version or 'default'}-{batch}.bin"
    body.write_bytes(grpc_frame(request))
    url = f"http://{endpoint.grpc}/{GRPC_SERVICE}/ModelInfer"
    headers = ("content-type: application/grpc", "te: trailers")
    row = h2load_row(target, "gRPC", url, concurrency, args, body, headers, work, frame_size=frame_size)
    return replace(row, check=check, batch=batch, model=model)


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
    onnx: Path = ONNX_MODEL,
) -> Row:
    """One row from benchmarks/load.py (the in-process limit; gRPC or REST without h2load).

    load.py checks every 10th answer against onnxruntime itself."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--modes", mode]
        command += ["--onnx", str(onnx), "--model", model, "--concurrency", str(concurrency)]
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
        # load.py imports the gateway's load generator: this checkout's, not the editable install's.
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
        }
        subprocess.run(
            pinned(cpu, command),
            cwd=ROOT,
            env=env,
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
        model,
    )


def present(row: Row | None) -> list[Row]:
    return [] if row is None else [row]
