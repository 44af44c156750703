"""Peers benchmark: modelyard against MLServer and KServe on the same ONNX model, in one run, with
the floor (a canned-answer server on the gateway's own stack) and the hot path's goals.

Serves model_repo/mlp/1/model.onnx from each server (MLServer and KServe in their own pinned venvs
under benchmarks/peers/, with the minimal runtimes in benchmarks/peer_runtimes/; MLServer in its
best setting for one core and in its default one), next to a canned-answer server
(benchmarks/canned.py), all up at once, and drives every target with the same load, in rounds
that interleave the targets (so the figures a verdict compares are taken seconds apart): h2load
for REST (HTTP/1.1) and gRPC, benchmarks/load.py for the in-process onnxruntime limit. Then the heavy MLP
(1024 -> 2048 -> 2048 -> 10, built from fixed seeds) with the gateway's dynamic batching off and
on, and mlp's weights as TorchScript on a TorchServe the gateway manages. Servers run on CPU 0,
the load generator on CPU 1. Prints the table and every goal's verdict (benchmarks/goals.py), and
writes them as markdown and JSON to benchmarks/results/. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort
from batching import CONFIGS as BATCHING_CONFIGS
from batching import SIZES as HEAVY_SIZES
from batching import build_repo, measure
from canned import write_answers
from drive import (
    H2LOAD,
    HEY,
    MODEL,
    ONNX_MODEL,
    OUTPUT_NAME,
    ROOT,
    Endpoint,
    Payload,
    Row,
    binary_payload,
    check_rest,
    check_torchserve,
    check_v2_binary,
    free_port,
    gateway,
    grpc_row,
    load_py_row,
    make_input,
    pinned,
    present,
    reference,
    rest_row,
    server,
    stop_servers_on_sigterm,
    v2_body,
)
from goals import (
    CANNED,
    CANNED_NATIVE,
    HEAVY,
    HEAVY_BATCHED,
    HEAVY_BATCHED_C8,
    INPROCESS,
    KSERVE,
    MLSERVER,
    MODELYARD,
    MODELYARD_GRPCIO,
    OK_CHECKS,
    find,
    floor_of,
    goal_table,
    verdicts,
)
from peer_venvs import PEER_PACKAGE, PEERS_DIR, RUNTIMES_DIR, ensure_venv, installed_version, kserve_command

from adapters.torchserve import modelyard_handler as wire

TORCH_MODEL = "mlp_torch"  # model_repo/mlp_torch version 1: mlp's weights as TorchScript
TORCH_VERSION = "1"
BATCH_ROW = 8  # the batch-8 row's rows per request, at concurrency 8
MLSERVER_DEFAULT = "MLServer (default: parallel_workers 1)"
V2_PROTOCOLS = ("REST JSON", "REST binary", "gRPC")
TARGETS = ("canned", "modelyard-grpcio", "mlserver", "mlserver-default", "kserve", "heavy", "torchserve")
# Dynamic batching for the heavy model at 8 clients: a batch is full when all 8 are in it.
HEAVY_BATCHING_C8 = "batching: {max_batch_size: 8, max_queue_delay_us: 2000}"
HEAVY_CONFIGS = {
    HEAVY: BATCHING_CONFIGS[HEAVY],
    HEAVY_BATCHED_C8: f"backend: onnxruntime\n{HEAVY_BATCHING_C8}\n",
    HEAVY_BATCHED: BATCHING_CONFIGS[HEAVY_BATCHED],
}
# What each peer runs with, for the report: the best documented setting for one core.
SETTINGS = {
    MLSERVER: "`parallel_workers: 0` (inference in the server's own process: MLServer's docs say the "
    "inference pool's IPC overhead is 'particularly noticeable for lightweight inference methods' and "
    "to disable parallel inference for them), `debug: false` (no access log line per request), metrics "
    "on as modelyard's are, adaptive batching off (modelyard's mlp rows do not batch either)",
    MLSERVER_DEFAULT: "the same with MLServer's default `parallel_workers: 1` (every request goes "
    "through one inference worker process); shown beside it, not used as a peer by the goals",
    KSERVE: "one worker (`workers=1`, its default: REST and its gRPC server in one event loop), "
    "uvloop (its default), no log line per request (`enable_latency_logging=False`, its loggers at "
    "WARNING through a log config); gRPC is KServe's own GRPCServer, servicer and interceptors, bound "
    "to 127.0.0.1 instead of the `[::]` it hard-codes (peer_runtimes/kserve_server.py)",
    MODELYARD_GRPCIO: "the same gateway on grpcio's gRPC server (`MODELYARD_GRPC_SERVER=grpcio`: what it "
    "runs with TLS on), grpc.aio as MLServer and KServe run it; gRPC rows only",
    CANNED: "benchmarks/canned.py: a bare ASGI app on uvicorn+httptools and grpc.aio with tritonclient's "
    "generated GRPCInferenceService, on one uvloop loop as the gateway runs them, returning prebuilt "
    "bytes of the correct answer: the floor of the stack",
    CANNED_NATIVE: "the same canned answer served by pygrpc-native (`canned.py --grpc-server native`): the "
    "floor of the native gRPC server's stack, against which the default gateway's gRPC rows are compared; "
    "gRPC rows only",
}


@dataclass(frozen=True)
class Payloads:
    json: Payload
    binary: Payload
    torchserve: Payload


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated levels for the mlp rows")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds measured per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds discarded before each row")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds the mlp rows are measured in, interleaved across targets (each round gets its share "
        "of --duration)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.md")
    parser.add_argument(
        "--skip", default="", help=f"comma-separated targets to leave out: {','.join(TARGETS)}"
    )
    args = parser.parse_args(argv)
    args.levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if not args.levels or min(args.levels) < 1 or args.duration <= 0 or args.warmup < 0 or args.rounds < 1:
        parser.error("concurrency levels must be >= 1, duration > 0, warmup >= 0, rounds >= 1")
    args.skipped = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skipped - set(TARGETS)
    if unknown:
        parser.error(
            f"unknown targets to skip: {', '.join(sorted(unknown))}; choose from {', '.join(TARGETS)}"
        )
    return args


def at(args: argparse.Namespace, concurrency: int) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "concurrency": concurrency})


# --- the v2 targets: all up at once, their rows interleaved round by round ----------------------


@dataclass(frozen=True)
class Served:
    """A v2 target up and serving mlp: where, over which protocols, and its checked answers."""

    target: str
    base: str
    endpoint: Endpoint
    protocols: tuple[str, ...] = V2_PROTOCOLS
    batch_row: bool = False  # also the batch-8 gRPC row (modelyard's)


# One row of the table: (target, protocol, concurrency, rows per request).
Cell = tuple[str, str, int, int]


@contextlib.contextmanager
def gateway_served(work: Path, grpcio: bool = False) -> Iterator[Served]:
    # A repository holding only mlp, so the gateway starts fast and serves exactly what the peers serve.
    repo = work / ("repo-grpcio" if grpcio else "repo")
    shutil.copytree(ROOT / "model_repo" / MODEL, repo / MODEL)
    with gateway(repo, f"/v2/models/{MODEL}/ready", env=grpc_server_env(grpcio)) as (base, endpoint, _):
        if grpcio:  # its REST side is the other row's
            yield Served(MODELYARD_GRPCIO, base, endpoint, ("gRPC",))
        else:
            yield Served(MODELYARD, base, endpoint, batch_row=True)


def grpc_server_env(grpcio: bool) -> dict[str, str]:
    """The gateway's default gRPC server (`auto`, which is the native one with TLS off), or grpcio's;
    set either way, whatever the bench's own environment says."""
    return {"MODELYARD_GRPC_SERVER": "grpcio" if grpcio else "auto"}


@contextlib.contextmanager
def canned_served(work: Path, expected: Any, native: bool = False) -> Iterator[Served]:
    """The canned answer on grpc.aio (all three protocols), or on pygrpc-native (its gRPC rows)."""
    answers = work / ("canned-native" if native else "canned")
    write_answers(answers, MODEL, "1", OUTPUT_NAME, expected)
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, str(ROOT / "benchmarks" / "canned.py"), "--answers", str(answers)]
    command += ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    command += ["--grpc-server", "native" if native else "grpcio"]
    base = f"http://127.0.0.1:{http_port}"
    target = CANNED_NATIVE if native else CANNED
    endpoint = Endpoint(target, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    name = "canned-native" if native else "canned"
    with server(name, pinned(0, command), f"{base}/v2/health/ready", ROOT, dict(os.environ)):
        yield Served(target, base, endpoint, ("gRPC",) if native else V2_PROTOCOLS)


def mlserver_dir(work: Path, http_port: int, grpc_port: int, parallel_workers: int) -> Path:
    """MLServer's settings and model-settings next to the runtime module, as `mlserver start` expects."""
    folder = work / f"mlserver-{parallel_workers}"
    folder.mkdir()
    shutil.copy(RUNTIMES_DIR / "mlserver_runtime.py", folder / "mlserver_runtime.py")
    settings = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": free_port(),
        "debug": False,
        "parallel_workers": parallel_workers,
    }
    model_settings = {
        "name": MODEL,
        "implementation": "mlserver_runtime.OnnxRuntime",
        "parameters": {"uri": str(ONNX_MODEL), "version": "1"},
    }
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "model-settings.json").write_text(json.dumps(model_settings))
    return folder


@contextlib.contextmanager
def mlserver_served(work: Path, parallel_workers: int, target: str) -> Iterator[Served]:
    venv = ensure_venv("mlserver")
    http_port, grpc_port = free_port(), free_port()
    folder = mlserver_dir(work, http_port, grpc_port, parallel_workers)
    base = f"http://127.0.0.1:{http_port}"
    command = pinned(0, [str(venv / "bin" / "mlserver"), "start", str(folder)])
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}"}
    # MLServer answers raw_output_contents when the request sends raw_input_contents, so the gRPC
    # rows drive it with the same request as modelyard's.
    endpoint = Endpoint(target, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    with server(target, command, f"{base}/v2/models/{MODEL}/ready", folder, env):
        yield Served(target, base, endpoint, ("REST JSON", "gRPC"))


@contextlib.contextmanager
def kserve_served(work: Path) -> Iterator[Served]:
    venv = ensure_venv("kserve")
    http_port, grpc_port = free_port(), free_port()
    command = kserve_command(venv, ONNX_MODEL, MODEL, http_port, grpc_port)
    base = f"http://127.0.0.1:{http_port}"
    endpoint = Endpoint(KSERVE, f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}")
    with server("kserve", pinned(0, command), f"{base}/v2/models/{MODEL}/ready", work, dict(os.environ)):
        yield Served(KSERVE, base, endpoint, ("REST JSON", "gRPC"))


class V2Rows:
    """The cells of the served targets, and one round of any of them. Each target's REST answers
    are checked once, before its first round; gRPC rows check one answer before each round."""

    def __init__(
        self,
        served: Sequence[Served],
        args: argparse.Namespace,
        payloads: Payloads,
        expected: Any,
        work: Path,
    ) -> None:
        self.served = {s.target: s for s in served}
        self.args, self.payloads, self.expected, self.work = args, payloads, expected, work
        self.checks: dict[tuple[str, str], str] = {}

    def cells(self) -> list[Cell]:
        """In the table's order: each target's protocols, each at every level."""
        cells: list[Cell] = []
        for s in self.served.values():
            cells += [
                (s.target, protocol, level, 1) for protocol in s.protocols for level in self.args.levels
            ]
            if s.batch_row:
                cells.append((s.target, "gRPC", BATCH_ROW, BATCH_ROW))
        return cells

    def run(self, cell: Cell, args: argparse.Namespace) -> Row | None:
        target, protocol, level, batch = cell
        s = self.served[target]
        if protocol == "gRPC":
            return grpc_row(target, s.endpoint, level, args, self.work, batch=batch)
        url = f"{s.base}/v2/models/{MODEL}/infer"
        payload = self.payloads.json if protocol == "REST JSON" else self.payloads.binary
        check = self.checks.get((target, protocol))
        if check is None:
            if protocol == "REST JSON":
                check = check_rest(url, payload.file.read_bytes(), self.expected)
            else:
                check = check_v2_binary(url, payload, self.expected)
            self.checks[target, protocol] = check
        return rest_row(target, protocol, url, level, args, payload, check, self.work)


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def merged(samples: Sequence[Row]) -> Row:
    """One cell's rounds as one row: the medians of req/s, p50 and p99; requests and errors summed;
    the first check that failed, if one did."""
    first = samples[0]
    return replace(
        first,
        req_per_s=_median([r.req_per_s for r in samples]),
        p50_ms=_median([r.p50_ms for r in samples]),
        p99_ms=_median([r.p99_ms for r in samples]),
        requests=sum(r.requests for r in samples),
        errors=sum(r.errors for r in samples),
        check=next((r.check for r in samples if r.check not in OK_CHECKS), first.check),
    )


def round_args(args: argparse.Namespace, index: int) -> argparse.Namespace:
    """A round measures its share of --duration; after the first, the servers are warm, so each
    row's warm-up is its share of --warmup too."""
    share = {"duration": args.duration / args.rounds}
    share["warmup"] = args.warmup if index == 0 else args.warmup / args.rounds
    return argparse.Namespace(**{**vars(args), **share})


def interleaved(v2: V2Rows, failures: list[str]) -> list[Row]:
    """Every cell, round after round. Within a round the targets of one (protocol, c, batch) run one
    after another, their order turned by one each round, so the figures a verdict compares are
    taken seconds apart, whatever the VM's speed does over the minutes of a run. A target that
    fails is reported, and its other cells left out."""
    cells = v2.cells()
    samples: dict[Cell, list[Row]] = {cell: [] for cell in cells}
    groups: dict[tuple[str, int, int], list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell[1:], []).append(cell)
    failed: set[str] = set()
    for index in range(v2.args.rounds):
        args = round_args(v2.args, index)
        for group in groups.values():
            turn = index % len(group)
            for cell in group[turn:] + group[:turn]:
                if cell[0] in failed:
                    continue
                try:
                    samples[cell] += present(v2.run(cell, args))
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    failures.append(f"{cell[0]}: {str(exc)[:500]}")
                    failed.add(cell[0])
    return [merged(samples[cell]) for cell in cells if samples[cell] and cell[0] not in failed]


def heavy_target(args: argparse.Namespace, work: Path) -> list[Row]:
    """The heavy MLP: its in-process batch-1 limit, then one gateway serving it with batching off,
    batching sized for 8 clients, and benchmarks/batching.py's batching (sized for 16)."""
    repo = work / "heavy_repo"
    onnx = build_repo(repo, HEAVY_CONFIGS)
    rows = [
        load_py_row(INPROCESS, "inprocess", level, args, None, model=HEAVY, onnx=onnx) for level in (1, 8)
    ]
    x = make_input(1, HEAVY_SIZES[0])
    expected = reference(x, onnx)
    plan = [
        (8, model, protocol) for model in (HEAVY, HEAVY_BATCHED_C8) for protocol in ("gRPC", "REST binary")
    ]
    plan += [(16, model, "gRPC") for model in (HEAVY, HEAVY_BATCHED)]
    with gateway(repo, "/v2/health/ready", env=grpc_server_env(grpcio=False)) as (base, endpoint, _):
        for concurrency, model, protocol in plan:
            row, mean_batch = measure(
                model, protocol, at(args, concurrency), base, endpoint, work, x, expected
            )
            rows.append(replace(row, mean_batch=mean_batch if model != HEAVY else None))
    if "modelyard-grpcio" in args.skipped:
        return rows
    # The gRPC rows again, on grpcio's gRPC server.
    with gateway(repo, "/v2/health/ready", env=grpc_server_env(grpcio=True)) as (base, endpoint, _):
        for concurrency, model, protocol in plan:
            if protocol != "gRPC":
                continue
            row, mean_batch = measure(
                model, protocol, at(args, concurrency), base, endpoint, work, x, expected
            )
            batch = mean_batch if model != HEAVY else None
            rows.append(replace(row, target=MODELYARD_GRPCIO, mean_batch=batch))
    return rows


# The second TorchServe pass: the gateway's own dynamic batching in front of TorchServe's, so that
# TorchServe's frontend and worker see one request per batch instead of one per client request.
GATEWAY_BATCHING = "batching: {max_batch_size: 8, max_queue_delay_us: 2000}"
# (direct target, gateway target, line added to mlp_torch's config.yaml) for each TorchServe pass.
TORCHSERVE_PASSES = (
    ("TorchServe direct", "modelyard -> TorchServe", ""),
    ("TorchServe direct (2nd start)", "modelyard+batching -> TorchServe", GATEWAY_BATCHING),
)


def torchserve_target(args: argparse.Namespace, payloads: Payloads, expected: Any, work: Path) -> list[Row]:
    """mlp's weights as TorchScript on the TorchServe the gateway manages (it inherits the gateway's
    CPU pinning): TorchServe's REST API called directly, then modelyard in front of it; once as
    model_repo has it, once with the gateway's batching added. Each pass starts its own TorchServe,
    and its direct rows are the baseline for its gateway rows.

    Their REST rows come from hey: TorchServe's status line has no reason phrase ("HTTP/1.1 200 "),
    which h2load 1.52 does not count as an answer."""
    rows = []
    for index, (direct_target, gateway_target_name, extra) in enumerate(TORCHSERVE_PASSES):
        repo = work / f"torch_repo_{index}"
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
    expected: Any,
    work: Path,
    repo: Path,
    direct_target: str,
    gateway_target_name: str,
    extra: str,
) -> list[Row]:
    rows = []
    ready = f"/v2/models/{TORCH_MODEL}/versions/{TORCH_VERSION}/ready"
    with gateway(repo, ready) as (base, endpoint, running):
        found = re.search(r"managed TorchServe up \(pid \d+, inference port (\d+)\)", running.log.read_text())
        if found is None:
            raise RuntimeError("the gateway's log does not say which port its TorchServe listens on")
        direct = f"http://127.0.0.1:{found.group(1)}/predictions/{TORCH_MODEL}/{TORCH_VERSION}"
        check_direct = check_torchserve(direct, payloads.torchserve, expected)
        url = f"{base}/v2/models/{TORCH_MODEL}/versions/{TORCH_VERSION}/infer"
        check_json = check_rest(url, payloads.json.file.read_bytes(), expected)
        check_binary = check_v2_binary(url, payloads.binary, expected)
        for level in args.levels:
            for target, protocol, address, payload, check in (
                (direct_target, "REST tensors", direct, payloads.torchserve, check_direct),
                (gateway_target_name, "REST binary", url, payloads.binary, check_binary),
                # The batching pass measures the binary and gRPC paths only.
                *([] if extra else [(gateway_target_name, "REST JSON", url, payloads.json, check_json)]),
            ):
                rows += present(
                    rest_row(target, protocol, address, level, args, payload, check, work, TORCH_MODEL, HEY)
                )
            row = grpc_row(MODELYARD, endpoint, level, args, work, TORCH_MODEL, TORCH_VERSION)
            rows.append(replace(row, target=gateway_target_name))
    return rows


# --- report ------------------------------------------------------------------------------------


def ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(base) or math.isnan(value):
        return "-"
    return f"{value / base:.2f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def torchserve_lines(rows: list[Row]) -> list[str]:
    """modelyard in front of TorchServe against TorchServe's own REST API, from the same start."""
    lines = []
    for direct_target, gateway_target_name, extra in TORCHSERVE_PASSES:
        for row in rows:
            ours = find(rows, gateway_target_name, "REST binary", row.concurrency, model=TORCH_MODEL)
            if row.target != direct_target or ours is None:
                continue
            lines.append(
                f"- in front of TorchServe{' with `' + extra + '`' if extra else ''}, c={row.concurrency}, "
                f"REST binary: {ratio(ours.req_per_s, row.req_per_s)}x TorchServe's own req/s, p50 "
                f"{ours.p50_ms:.2f} vs {row.p50_ms:.2f} ms"
            )
    return lines


def render(rows: list[Row], meta: dict[str, Any]) -> str:
    lines = [
        "# modelyard vs MLServer vs KServe (and TorchServe), with the canned-answer floor",
        "",
        "`mlp` is 64->256->256->10 FP32 (model_repo/mlp); `heavy*` is 1024->2048->2048->10 FP32, built from "
        "fixed seeds at run time (benchmarks/batching.py). Every request carries batch 1 unless the batch "
        "column says otherwise.",
        "",
        f"- Run: {meta['date']}, command `{meta['command']}`",
        f"- Machine: {meta['cpu']}, {meta['cores']} cores (a shared VM: the load average below says what "
        "else ran; compare rows only within this run)",
        f"- Load average (1, 5, 15 min) before: {meta['load_before']}, after: {meta['load_after']}",
        f"- Pinning: {meta['pinning']}",
        f"- {meta['duration']:g} s measured per row after {meta['warmup']:g} s warm-up; load from "
        f"{meta['generator']}, the same body every request (v2 JSON, v2 binary, a raw-contents "
        "ModelInferRequest, or TorchServe tensors); in-process from benchmarks/load.py",
        f"- The mlp rows of the servers ran in {meta.get('rounds', 1)} rounds, all the servers up at once (each "
        "idle but for its own rows): in each round the targets of one protocol and c ran one after another, "
        "their order turned by one each round, each for its share of the measured time (the first round "
        "after the full warm-up, later ones after their share of it). So the figures a verdict compares were "
        "taken seconds apart, however the VM's speed moved over the run. req/s, p50 and p99 are the medians "
        "of the rounds; requests and errors their sums. The heavy and TorchServe rows ran once each, after.",
        f"- Versions: Python {meta['python']}, onnxruntime {meta['onnxruntime']} (all servers), "
        f"MLServer {meta.get('mlserver', '-')}, KServe {meta.get('kserve', '-')}, TorchServe "
        f"{meta['torchserve']} with torch {meta['torch']}",
        f"- {MLSERVER}: {SETTINGS[MLSERVER]}",
        f"- {MLSERVER_DEFAULT}: {SETTINGS[MLSERVER_DEFAULT]}",
        f"- {KSERVE} (0.21): {SETTINGS[KSERVE]}",
        f"- {CANNED}: {SETTINGS[CANNED]}",
        f"- {CANNED_NATIVE}: {SETTINGS[CANNED_NATIVE]}",
        f"- {MODELYARD_GRPCIO} (grpcio {package_version('grpcio')}): {SETTINGS[MODELYARD_GRPCIO]}",
        "- modelyard: `python -m gateway serve` on a repository of mlp alone, as it starts by default: "
        f"gRPC on the native gRPC server (pygrpc-native {package_version('pygrpc-native')}, "
        "`MODELYARD_GRPC_SERVER=auto` with TLS off), whose HTTP/2 and gRPC work runs in Rust threads "
        "outside the GIL "
        "(heavy: of the three heavy "
        f"deployments, with `{HEAVY_BATCHING_C8}` for c=8 and batching.py's config for c=16); TorchServe "
        "rows: model_repo/mlp_torch on the gateway's managed TorchServe (1 worker, TorchServe batching up "
        f"to 8 with 2 ms delay), the `modelyard+batching` rows add `{GATEWAY_BATCHING}` on a second start",
        "- check: one request per target and protocol before timing, compared with onnxruntime "
        "(np.allclose, rtol 1e-4, atol 1e-5); load.py rows compare every 10th answer. errors: non-200 "
        "answers, transport errors, gRPC answers short of a full answer frame, mismatches.",
        "",
        "| target | model | protocol | generator | batch | c | req/s | p50 ms | p99 ms | requests | errors | "
        "x canned (same protocol, c) | mean batch | check |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        floor = (
            find(rows, floor_of(row.target, row.protocol), row.protocol, row.concurrency, row.batch)
            if row.model == MODEL
            else None
        )
        lines.append(
            f"| {row.target} | {row.model} | {row.protocol} | {row.generator} | {row.batch} | {row.concurrency} | "
            f"{fmt(row.req_per_s, 0)} | {fmt(row.p50_ms, 3)} | {fmt(row.p99_ms)} | {row.requests} | "
            f"{row.errors} | {ratio(row.req_per_s, floor.req_per_s if floor else None)} | "
            f"{fmt(row.mean_batch, 1)} | {row.check} |"
        )
    lines += ["", "## Goals", "", *goal_table(), "", "Verdicts from this run's rows:", ""]
    lines += [verdict.line() for verdict in verdicts(rows)]
    extra = torchserve_lines(rows)
    if extra:
        lines += ["", "In front of TorchServe (same TorchServe start):", "", *extra]
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


def generator() -> str:
    if shutil.which(H2LOAD):
        result = subprocess.run([H2LOAD, "--version"], capture_output=True, text=True, timeout=30)
        version = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "version unknown"
        return f"h2load ({version}; `--h1` for REST, per-request latencies in µs)"
    if shutil.which(HEY):
        return "hey for REST (0.1 ms latency resolution; h2load is missing), load.py for gRPC"
    return "load.py (h2load and hey are missing)"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_payloads(work: Path, x: Any) -> Payloads:
    json_file, tensors_file = work / "body.json", work / "body.tensors"
    json_file.write_bytes(v2_body(x))
    tensors_file.write_bytes(wire.encode_tensors("inputs", {"input": x}, {"outputs": [OUTPUT_NAME]}))
    return Payloads(
        Payload(json_file, "application/json"),
        binary_payload(work / "body.bin", x),
        Payload(tensors_file, wire.CONTENT_TYPE),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    stop_servers_on_sigterm()
    if shutil.which(H2LOAD) is None:
        print(
            "h2load is missing (apt-get install -y nghttp2-client): rows fall back to hey and load.py",
            file=sys.stderr,
        )
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
        "rounds": args.rounds,
        "generator": generator(),
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
        rows += [load_py_row(INPROCESS, "inprocess", level, args, None) for level in args.levels]
        rows.append(load_py_row(INPROCESS, "inprocess", BATCH_ROW, args, None, batch=BATCH_ROW))
        # (name, the targets it needs, none of them skipped, its start)
        v2_starts = (
            ("canned", ("canned",), lambda: canned_served(work, expected)),
            ("canned-native", ("canned",), lambda: canned_served(work, expected, native=True)),
            ("modelyard", (), lambda: gateway_served(work)),
            ("modelyard-grpcio", ("modelyard-grpcio",), lambda: gateway_served(work, grpcio=True)),
            ("mlserver", ("mlserver",), lambda: mlserver_served(work, 0, MLSERVER)),
            ("mlserver-default", ("mlserver-default",), lambda: mlserver_served(work, 1, MLSERVER_DEFAULT)),
            ("kserve", ("kserve",), lambda: kserve_served(work)),
        )
        with contextlib.ExitStack() as stack:
            served = []
            for name, needs, start in v2_starts:
                if any(need in args.skipped for need in needs):
                    continue
                # A target that fails to install or start is reported under the table; the others still run.
                try:
                    served.append(stack.enter_context(start()))
                except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                    meta["failures"].append(f"{name}: {str(exc)[:500]}")
            rows += interleaved(V2Rows(served, args, payloads, expected, work), meta["failures"])
        others = (
            ("heavy", lambda: heavy_target(args, work)),
            ("torchserve", lambda: torchserve_target(args, payloads, expected, work)),
        )
        for name, target in others:
            if name in args.skipped:
                continue
            try:
                rows += target()
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                meta["failures"].append(f"{name}: {str(exc)[:500]}")
        for name in ("mlserver", "kserve"):
            if (PEERS_DIR / name).is_dir():
                with contextlib.suppress(subprocess.SubprocessError, OSError):
                    meta[name] = installed_version(PEERS_DIR / name, PEER_PACKAGE[name])
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
    payload = {"meta": meta, "rows": records, "verdicts": [asdict(v) for v in verdicts(rows)]}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
