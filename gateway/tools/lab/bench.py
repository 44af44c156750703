"""`modelyard bench`: one model's deployments measured one after the other through the gateway.

Each scenario (deployment x batch x concurrency) runs lab/load.py's closed-loop workers for a fixed
time after a warm-up, checking every 10th answer against the reference deployment's (the first
one). Before and after them, the same workers against a no-op endpoint give the generator's own ceiling; after
each deployment, the gateway's `/status` gives the memory of the process that served it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2, service_pb2_grpc

from adapters import BACKENDS, backend_named
from gateway.net import NotReady, free_port, wait_ready
from gateway.tools import parity
from gateway.tools.errors import ToolError
from gateway.tools.lab import load
from gateway.tools.lab.machine import machine_facts
from gateway.tools.lab.results import (
    BenchPlan,
    BenchResult,
    ParityRow,
    Scenario,
    format_table,
    phase_means,
    verdicts,
)
from gateway.types import Datatype, TensorSpec, numpy_dtype

PROTOCOLS = ("rest-json", "rest-binary", "grpc")
READY_TIMEOUT_S = 300.0
# Latencies kept per scenario for the CDF plot (evenly spaced quantiles of all of them).
CDF_POINTS = 200
# The gateway's per-request phase histogram (gateway/metrics.py), as the bench reads it.
PHASE_FAMILY = "modelyard_request_phase_seconds"
SEED = parity.SEED

__all__ = ["BenchPlan", "BenchResult", "ParityRow", "Scenario", "format_table", "machine_facts", "verdicts"]


class BenchError(ToolError):
    """The bench cannot run as asked: bad flags, an unknown deployment, a gateway that is not there."""


@dataclass(frozen=True, slots=True)
class Target:
    """One deployment to measure: a model of the gateway at one version, on one backend."""

    kind: str
    model: str
    version: int

    @property
    def label(self) -> str:
        return f"{self.kind} {self.model}:{self.version}"


# --- flags ---------------------------------------------------------------------------------------


def parse_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BenchError(f"{flag} takes positive integers like 1,4,16; got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise BenchError(f"{flag} takes positive integers like 1,4,16; got '{text}'")
    return values


def parse_duration(text: str, flag: str = "--duration", allow_zero: bool = False) -> float:
    """`10s`, `500ms`, `1m` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", text)
    if match is None:
        raise BenchError(f"{flag} takes a time like 10s, 500ms or 1m; got '{text}'")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[match.group(2) or "s"]
    if value < 0 or (value == 0 and not allow_zero):
        raise BenchError(f"{flag} must be more than zero; got '{text}'")
    return value


def deployment_kinds() -> list[str]:
    """The backend names and aliases --deployments accepts, from the registry of backends."""
    return [name for backend, adapter in BACKENDS.items() for name in (backend, *adapter.aliases)]


def resolve_targets(
    model: str, deployments: str | None, versions: str | None, status: dict[str, Any]
) -> list[Target]:
    """The deployments to measure, from the gateway's /status.

    --deployments takes backends by name or alias (`deployment_kinds()`: MODEL's own backend or
    the twin whose `twin_of` is MODEL) or model names, each with an optional :VERSION. --versions takes
    versions of MODEL. Neither: MODEL and each of its twins.
    """
    models = {m["name"]: m for m in status["models"]}
    if model not in models:
        raise BenchError(f"the gateway has no model '{model}' loaded (it has: {', '.join(sorted(models))})")
    family = [models[model], *(m for name, m in sorted(models.items()) if m["twin_of"] == model)]
    if deployments and versions:
        raise BenchError("give --deployments or --versions, not both")
    wanted: list[tuple[str, int | None]]
    if versions:
        wanted = [(model, int(v)) for v in parse_ints(versions, "--versions")]
    elif deployments:
        wanted = [_resolve_one(part.strip(), model, family, models) for part in deployments.split(",")]
    else:
        wanted = [(m["name"], None) for m in family]
    targets = []
    for name, version in wanted:
        entry = models[name]
        ready = [v["version"] for v in entry["versions"] if v["state"] == "READY"]
        chosen = version if version is not None else entry["default_version"]
        if chosen not in ready:
            known = ", ".join(map(str, ready)) or "none"
            raise BenchError(f"model '{name}' version {chosen} is not ready (ready versions: {known})")
        backend = next(v["backend"] for v in entry["versions"] if v["version"] == chosen)
        targets.append(Target(backend, name, chosen))
    if len(set(targets)) != len(targets):
        raise BenchError(f"a deployment is named twice: {', '.join(t.label for t in targets)}")
    return targets


def _resolve_one(
    text: str, model: str, family: list[dict[str, Any]], models: dict[str, Any]
) -> tuple[str, int | None]:
    name, sep, version_text = text.partition(":")
    if not name or (sep and not version_text.isdigit()):
        raise BenchError(
            f"'{text}' is not a deployment: write a backend (onnx, torchserve, ...) or MODEL[:VERSION]"
        )
    version = int(version_text) if sep else None
    backend = backend_named(name)
    if backend is not None and name not in models:
        matches = [m["name"] for m in family if m["backend"] == backend]
        if not matches:
            have = ", ".join(f"{m['name']} ({m['backend']})" for m in family)
            raise BenchError(
                f"no deployment of '{model}' on {backend}: its deployments are {have}. "
                f"A twin declares `twin_of: {model}` in its config.yaml"
            )
        if len(matches) > 1:
            raise BenchError(
                f"several deployments of '{model}' run on {backend} ({', '.join(matches)}): name one"
            )
        return matches[0], version
    if name not in models:
        raise BenchError(
            f"'{name}' is neither a backend ({', '.join(deployment_kinds())}) nor a loaded model"
        )
    return name, version


# --- the gateway ---------------------------------------------------------------------------------


@contextlib.contextmanager
def started_gateway(model_repo: Path, log_path: Path) -> Iterator[tuple[str, str]]:
    """A gateway of this installation serving `model_repo` on free loopback ports, until the block ends."""
    if not model_repo.is_dir():
        raise BenchError(f"{model_repo} is not a model repository folder")
    http, grpc_port = free_port(), free_port()
    command = [
        sys.executable, "-m", "gateway", "serve", "--model-repo", str(model_repo), "--host", "127.0.0.1",
        "--http-port", str(http), "--grpc-port", str(grpc_port), "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{http}"
        try:
            wait_ready(url, READY_TIMEOUT_S, process=process, interval_s=0.2)
        except NotReady as exc:
            raise BenchError(f"{exc}; its log: {log_path}") from None
        yield url, f"127.0.0.1:{grpc_port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


# --- workload ------------------------------------------------------------------------------------


async def _signature(client: httpx.AsyncClient, target: Target) -> tuple[str, str, str, Datatype, list[int]]:
    """(input name, output name, input datatype, output datatype, input shape) from v2 metadata."""
    response = await client.get(f"/v2/models/{target.model}/versions/{target.version}")
    if response.status_code != 200:
        raise BenchError(f"metadata of {target.label}: HTTP {response.status_code} {response.text[:200]}")
    meta = response.json()
    if len(meta["inputs"]) != 1 or len(meta["outputs"]) != 1:
        raise BenchError(
            f"{target.label} has {len(meta['inputs'])} inputs and {len(meta['outputs'])} outputs; "
            "bench drives models with one input and one output"
        )
    (spec,), (out,) = meta["inputs"], meta["outputs"]
    return spec["name"], out["name"], spec["datatype"], Datatype(out["datatype"]), spec["shape"]


def input_rows(
    shape: list[int], datatype: str, name: str, rows: int, given: Path | None
) -> np.ndarray[Any, Any]:
    """Rows of input to cut requests from: the file's (an .npz keyed by input name), or generated."""
    if given is not None:
        arrays = parity.read_inputs(given)
        if name not in arrays:
            raise BenchError(f"{given} has no array '{name}' (it has: {', '.join(arrays) or 'none'})")
        array = arrays[name]
        if array.ndim != len(shape) or array.shape[0] < 1:
            raise BenchError(f"{given}: '{name}' has shape {list(array.shape)}; the model takes {shape}")
        return array.astype(numpy_dtype(Datatype(datatype)), copy=False)
    if shape and shape[0] != -1:
        raise BenchError(f"input '{name}' has shape {shape}: bench needs a batch (-1) first dimension")
    spec = TensorSpec(name, Datatype(datatype), (-1, *shape[1:]))
    return parity.generate_inputs([spec], batch=rows, seed=SEED)[name]


def make_workload(
    target: Target, names: tuple[str, str, str, Datatype], rows: np.ndarray[Any, Any], batch: int
) -> load.Workload:
    """A pool of requests of `batch` rows each, cut from `rows` (wrapping around); no expected outputs yet."""
    input_name, output_name, datatype, output_type = names
    count = len(rows)
    inputs = [
        np.take(rows, np.arange(i * batch, (i + 1) * batch) % count, axis=0)
        for i in range(load.INPUT_POOL_SIZE)
    ]
    placeholder = [np.empty(0, numpy_dtype(output_type))]
    return load.Workload(
        target.model, str(target.version), input_name, output_name, datatype, inputs, placeholder
    )


def sender(protocol: str, client: load.RestClient, stub: Any, workload: load.Workload) -> load.AsyncSend:
    if protocol == "rest-json":
        return load.rest_json_send(client, workload)
    if protocol == "rest-binary":
        return load.rest_binary_send(client, workload)
    return load.grpc_send(stub, workload)


async def answers(target: Target, send: load.AsyncSend, count: int) -> list[np.ndarray[Any, Any]]:
    """The target's answers to the first `count` requests of the pool, one at a time."""
    try:
        return [await send(item) for item in range(count)]
    # Any failure here (an HTTP error status, a gRPC error, a malformed answer) means the target
    # cannot be measured: say which and why, instead of a traceback.
    except Exception as exc:
        raise BenchError(f"{target.label} did not answer a request: {type(exc).__name__}: {exc}") from exc


def noop_sender(protocol: str, client: load.RestClient, stub: Any) -> load.AsyncSend:
    """The cheapest request the gateway answers on the protocol: its liveness check."""
    empty = np.empty(0, np.float32)
    if protocol == "grpc":
        request = service_pb2.ServerLiveRequest()

        async def send_grpc(item: int) -> np.ndarray[Any, Any]:
            await stub.ServerLive(request, timeout=load.REQUEST_TIMEOUT_S)
            return empty

        return send_grpc

    async def send_rest(item: int) -> np.ndarray[Any, Any]:
        load.expect_ok(await client.get("/v2/health/live"))
        return empty

    return send_rest


# --- the run -------------------------------------------------------------------------------------

Progress = Callable[[str, float], None]  # (what runs now, seconds it takes)


async def run_bench(
    plan: BenchPlan, url: str, grpc_address: str, progress: Progress | None = None
) -> BenchResult:
    concurrency = max(plan.concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    # httpx for the few control requests (status, metadata); the load goes over RestClient.
    async with (
        httpx.AsyncClient(base_url=url, limits=limits, timeout=load.REQUEST_TIMEOUT_S) as client,
        load.RestClient(url, concurrency) as rest,
        grpc.aio.insecure_channel(grpc_address, options=options) as channel,
    ):
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        status = await _status(client)
        targets = resolve_targets(plan.model, plan.deployments, plan.versions, status)
        if plan.protocol == "grpc":
            try:
                await stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=5.0)
            except grpc.aio.AioRpcError as exc:
                raise BenchError(f"gRPC endpoint {grpc_address} unreachable: {exc.code().name}") from exc
        signatures = {t: await _signature(client, t) for t in targets}
        reference = targets[0]
        rows = input_rows(
            signatures[reference][4],
            signatures[reference][2],
            signatures[reference][0],
            load.INPUT_POOL_SIZE * max(plan.batch),
            plan.inputs,
        )
        expected = {}
        parity_rows = []
        for batch in plan.batch:
            ref = make_workload(reference, signatures[reference][:4], rows, batch)
            expected[batch] = await answers(
                reference, sender(plan.protocol, rest, stub, ref), load.INPUT_POOL_SIZE
            )
        for target in targets[1:]:
            workload = make_workload(target, signatures[target][:4], rows, plan.batch[0])
            got = await answers(target, sender(plan.protocol, rest, stub, workload), load.INPUT_POOL_SIZE)
            parity_rows.append(_parity(target, reference, workload.output_name, expected[plan.batch[0]], got))

        ceiling_config = load.RunConfig(concurrency, 1, plan.duration_s, plan.warmup_s)
        nothing = [np.empty(0, np.float32)] * load.INPUT_POOL_SIZE
        probe = load.Workload("", "", "", "", "", nothing, nothing)

        async def measure_ceiling(when: str) -> Scenario:
            if progress:
                progress(
                    f"load generator ceiling {when} (no-op, c={concurrency})", plan.warmup_s + plan.duration_s
                )
            return await _measure(
                Target("no-op", "/v2/health/live", 0),
                plan.protocol,
                ceiling_config,
                noop_sender(plan.protocol, rest, stub),
                probe,
            )

        # Measured before and after the deployments: on a shared machine one run can be disturbed.
        ceiling_runs = [await measure_ceiling("first")]

        scenarios = []
        for target in targets:
            measured = []
            for batch in plan.batch:
                workload = dataclasses.replace(
                    make_workload(target, signatures[target][:4], rows, batch), expected=expected[batch]
                )
                send = sender(plan.protocol, rest, stub, workload)
                for clients in plan.concurrency:
                    config = load.RunConfig(clients, batch, plan.duration_s, plan.warmup_s)
                    if progress:
                        progress(f"{target.label} batch {batch} c={clients}", plan.warmup_s + plan.duration_s)
                    before = await _phase_totals(client, target)
                    row = await _measure(target, plan.protocol, config, send, workload)
                    after = await _phase_totals(client, target)
                    measured.append(dataclasses.replace(row, phases_ms=phase_means(before, after)))
            process, rss = _memory(await _status(client), target)
            scenarios += [dataclasses.replace(s, rss_mib=rss, rss_process=process) for s in measured]
        ceiling_runs.append(await measure_ceiling("again"))
    ceiling = max(ceiling_runs, key=lambda s: s.req_per_s)
    result = BenchResult(plan, url, machine_facts(), ceiling, scenarios, parity_rows, ceiling_runs)
    result.verdicts = verdicts(result)
    return result


async def _status(client: httpx.AsyncClient) -> dict[str, Any]:
    try:
        response = await client.get("/status")
    except httpx.HTTPError as exc:
        raise BenchError(f"no gateway at {client.base_url}: {exc}") from exc
    if response.status_code != 200:
        raise BenchError(
            f"{client.base_url}/status: HTTP {response.status_code}: is this a modelyard gateway?"
        )
    status: dict[str, Any] = response.json()
    return status


def _parity(
    target: Target,
    reference: Target,
    output: str,
    want: list[np.ndarray[Any, Any]],
    got: list[np.ndarray[Any, Any]],
) -> ParityRow:
    report = parity.compare(
        {output: np.concatenate(want)},
        {output: np.concatenate(got)},
        left_name=reference.label,
        right_name=target.label,
    )
    diff = report.outputs[0]
    return ParityRow(target.label, reference.label, output, diff.max_abs, diff.max_rel, diff.within)


async def _measure(
    target: Target, protocol: str, config: load.RunConfig, send: load.AsyncSend, workload: load.Workload
) -> Scenario:
    """One scenario, with the CPU the bench process itself used meanwhile: the generator runs on
    one event loop thread, so near 1.0 core it would be the limit."""
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    tallies, elapsed = await load.run_async(send, workload, config)
    cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    row = load.summarize(target.label, config, tallies, elapsed)
    latencies = np.array([lat for tally in tallies for lat in tally.latencies]) * 1000.0
    quantiles = (
        np.quantile(latencies, np.linspace(0.0, 1.0, CDF_POINTS)).round(4).tolist() if latencies.size else []
    )
    return Scenario(
        deployment=target.label,
        kind=target.kind,
        model=target.model,
        version=target.version,
        protocol=protocol,
        batch=config.batch,
        concurrency=config.concurrency,
        requests=row.requests,
        req_per_s=row.req_per_s,
        p50_ms=row.p50_ms,
        p90_ms=row.p90_ms,
        p99_ms=row.p99_ms,
        errors=row.errors,
        first_error=row.first_error,
        rss_mib=None,
        rss_process=None,
        generator_cpu=round(cpu, 3),
        latency_quantiles_ms=quantiles,
    )


async def _phase_totals(client: httpx.AsyncClient, target: Target) -> dict[str, tuple[float, float]]:
    """(seconds, requests) of each phase of the target's requests so far, from the gateway's metrics."""
    response = await client.get("/metrics")
    if response.status_code != 200:
        return {}
    totals: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != PHASE_FAMILY:
            continue
        for sample in family.samples:
            labels = sample.labels
            if labels.get("model") != target.model or labels.get("version") != str(target.version):
                continue
            kept = totals.setdefault(labels["phase"], [0.0, 0.0])
            if sample.name.endswith("_sum"):
                kept[0] += sample.value
            elif sample.name.endswith("_count"):
                kept[1] += sample.value
    return {phase: (seconds, count) for phase, (seconds, count) in totals.items()}


def _memory(status: dict[str, Any], target: Target) -> tuple[str | None, float | None]:
    """The process serving the target, and its RSS (MiB), as the gateway reports them."""
    served = f"{target.model}:{target.version}"
    for process in status["processes"]:
        if served in process["serves"] and process["rss_bytes"] is not None:
            return process["name"], process["rss_bytes"] / 2**20
    return None, None


def grpc_address_for(url: str, grpc: str | None) -> str:
    """The gRPC host:port: as given, else the HTTP URL's host with its port plus one (8000 -> 8001)."""
    if grpc:
        return grpc
    parsed = httpx.URL(url)
    port = parsed.port or 80
    return f"{parsed.host}:{port + 1}"
