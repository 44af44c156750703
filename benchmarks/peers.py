"""Peers benchmark: modelyard against MLServer and KServe on the same ONNX model, in one run.

Installs MLServer and KServe into their own venvs under benchmarks/peers/ (pinned, on demand),
serves model_repo/mlp/1/model.onnx from each with the minimal runtimes in benchmarks/peer_runtimes/,
and drives every target with the same load: Debian's `hey` for REST JSON, benchmarks/load.py for
gRPC and for the in-process onnxruntime limit. Servers run on CPU 0, the load generator on CPU 1.
Writes a markdown table and JSON to benchmarks/results/. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
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

import numpy as np
import onnxruntime as ort
from peer_venvs import PEER_PACKAGE, PEERS_DIR, RUNTIMES_DIR, ensure_venv, installed_version, kserve_command

ROOT = Path(__file__).resolve().parent.parent
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
# hey's summary prints latencies in seconds with 4 decimals, so percentiles have 0.1 ms resolution.
HEY = "hey"


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
    parser.add_argument("--skip", default="", help="comma-separated targets to leave out: mlserver,kserve")
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
def server(name: str, command: list[str], ready_url: str, cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """Run `command` in its own process group until the block ends; it must answer `ready_url` first."""
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
        yield
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


def make_input() -> np.ndarray:
    return np.random.default_rng(INPUT_SEED).standard_normal((1, 64)).astype(np.float32)


def reference(x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ONNX_MODEL), options, providers=["CPUExecutionProvider"])
    output: np.ndarray = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return output


def v2_body(x: np.ndarray) -> bytes:
    tensor = {"name": INPUT_NAME, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


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


def run_hey(url: str, concurrency: int, seconds: float, body_file: Path | None) -> str:
    command = [HEY, "-z", f"{seconds:g}s", "-c", str(concurrency), "-cpus", "1", "-t", "30"]
    if body_file is not None:
        command += ["-m", "POST", "-T", "application/json", "-D", str(body_file)]
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
    body: Path | None,
    check: str,
) -> Row | None:
    """One REST row from hey; without hey, from load.py's rest-json mode (no ceiling row then)."""
    if shutil.which(HEY) is None:
        if body is None:
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
    target: str, mode: str, concurrency: int, args: argparse.Namespace, endpoint: Endpoint | None
) -> Row:
    """One row from benchmarks/load.py (gRPC, the in-process limit, or REST without hey).

    load.py checks every 10th answer against onnxruntime itself."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        command = [sys.executable, str(ROOT / "benchmarks" / "load.py"), "--modes", mode]
        command += ["--onnx", str(ONNX_MODEL), "--model", MODEL, "--concurrency", str(concurrency)]
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
    )


def present(row: Row | None) -> list[Row]:
    return [] if row is None else [row]


# --- targets -----------------------------------------------------------------------------------


def gateway_target(args: argparse.Namespace, body: Path, expected: np.ndarray, work: Path) -> list[Row]:
    # A repository holding only mlp, so the gateway starts fast and serves exactly what the peers serve.
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repo" / "mlp", repo / MODEL)
    http_port, grpc_port = free_port(), free_port()
    command = [str(ROOT / ".venv" / "bin" / "modelyard"), "serve", "--model-repo", str(repo)]
    command += ["--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--log-level", "warning"]
    base = f"http://127.0.0.1:{http_port}"
    endpoint = Endpoint("modelyard", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    rows = []
    with server("modelyard", pinned(0, command), f"{base}/v2/health/ready", ROOT, dict(os.environ)):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, body.read_bytes(), expected)
        for level in args.levels:
            live = f"{base}/v2/health/live"
            rows += present(
                hey_row("hey ceiling (GET /v2/health/live)", "REST GET", live, level, args, None, "-")
            )
        for level in args.levels:
            rows += present(hey_row("modelyard", "REST JSON", url, level, args, body, check))
        for level in args.levels:
            rows.append(load_py_row("modelyard", "grpc", level, args, endpoint))
    return rows


def mlserver_target(args: argparse.Namespace, body: Path, expected: np.ndarray, work: Path) -> list[Row]:
    venv = ensure_venv("mlserver")
    http_port, grpc_port = free_port(), free_port()
    folder = mlserver_dir(work, http_port, grpc_port)
    base = f"http://127.0.0.1:{http_port}"
    command = pinned(0, [str(venv / "bin" / "mlserver"), "start", str(folder)])
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    rows = []
    with server("mlserver", command, f"{base}/v2/models/{MODEL}/ready", folder, env):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, body.read_bytes(), expected)
        for level in args.levels:
            rows += present(hey_row("MLServer", "REST JSON", url, level, args, body, check))
        # MLServer answers raw_output_contents when the request sends raw_input_contents, so
        # load.py's gRPC mode (the one modelyard's gRPC rows use) drives it unchanged.
        endpoint = Endpoint("MLServer", f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
        for level in args.levels:
            rows.append(load_py_row("MLServer", "grpc", level, args, endpoint))
    return rows


def kserve_target(args: argparse.Namespace, body: Path, expected: np.ndarray, work: Path) -> list[Row]:
    venv = ensure_venv("kserve")
    http_port, grpc_port = free_port(), free_port()
    command = kserve_command(venv, ONNX_MODEL, MODEL, http_port, grpc_port)
    base = f"http://127.0.0.1:{http_port}"
    rows = []
    with server("kserve", pinned(0, command), f"{base}/v2/models/{MODEL}/ready", work, dict(os.environ)):
        url = f"{base}/v2/models/{MODEL}/infer"
        check = check_rest(url, body.read_bytes(), expected)
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
    return lines


def find(rows: list[Row], target: str | None, protocol: str, concurrency: int) -> Row | None:
    return next(
        (
            r
            for r in rows
            if (target is None or r.target == target)
            and r.protocol == protocol
            and r.concurrency == concurrency
        ),
        None,
    )


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# modelyard vs MLServer vs KServe: `mlp` (64->256->256->10, FP32), batch 1",
        "",
        f"- Run: {meta['date']}, command `{meta['command']}`",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores (a 2-core VM shared with other work; "
        "absolute numbers are a floor, compare rows only within this run)",
        f"- Load average (1, 5, 15 min) before: {meta['load_before']}, after: {meta['load_after']}",
        f"- Pinning: {meta['pinning']}",
        f"- {meta['duration']:g} s measured per row after {meta['warmup']:g} s warm-up; REST load from "
        f"`hey` ({meta['hey']}), the same v2 JSON body every request; gRPC and in-process from "
        "benchmarks/load.py",
        f"- Versions: Python {meta['python']}, onnxruntime {meta['onnxruntime']} (all servers), "
        f"MLServer {meta.get('mlserver', '-')} (default settings: parallel_workers 1), "
        f"KServe {meta.get('kserve', '-')} (one worker)",
        "- check: one REST request per target before timing compared with onnxruntime (np.allclose, "
        "rtol 1e-4, atol 1e-5); load.py rows compare every 10th answer. errors: non-200 answers, "
        "transport errors, mismatches. hey reports latency with 0.1 ms resolution.",
        "",
        "| target | protocol | generator | concurrency | req/s | p50 ms | p99 ms | requests | errors | "
        "vs MLServer req/s (same protocol) | vs in-process req/s | check |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        # MLServer on the same protocol: the comparison issue 6 asks for.
        peer = find(rows, "MLServer", row.protocol, row.concurrency)
        limit = find(rows, None, "in-process", row.concurrency)
        mlserver = peer.req_per_s if peer else None
        inproc = limit.req_per_s if limit else None
        lines.append(
            f"| {row.target} | {row.protocol} | {row.generator} | {row.concurrency} | {fmt(row.req_per_s, 0)} | "
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
        "failures": [],
    }
    x = make_input()
    expected = reference(x)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="modelyard-peers-") as tmp:
        work = Path(tmp)
        body = work / "body.json"
        body.write_bytes(v2_body(x))
        rows += [load_py_row("onnxruntime", "inprocess", level, args, None) for level in args.levels]
        rows += gateway_target(args, body, expected, work)
        for name, target in (("mlserver", mlserver_target), ("kserve", kserve_target)):
            if name in args.skipped:
                continue
            # A peer that fails to install or start is reported under the table; the others still run.
            try:
                rows += target(args, body, expected, work)
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
