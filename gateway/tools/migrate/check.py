"""`modelyard migrate check`: the new deployment answers as the source does, version for version.

The source runs in-process with its own framework: a TorchServe model's TorchScript module with
torch (the gateway would need a TorchServe for it otherwise), a SavedModel or a Keras model through
the real adapter. The new deployment runs through a `Registry` with its real adapter, as the
gateway will serve it. The inputs are an .npz file, recorded traffic (the gateway's `record:`
files, one request each) or inputs generated from the source's signature.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from adapters import ModelAdapter
from gateway.registry import Registry
from gateway.repository import ModelEntry
from gateway.tools.convert import RunSource, torch_runner
from gateway.tools.migrate import state
from gateway.tools.migrate.convert import source_entry, torchscript_file
from gateway.tools.migrate.state import Migration, MigrationError
from gateway.tools.parity import (
    DEFAULT_ATOL,
    DEFAULT_BATCH,
    DEFAULT_RTOL,
    Arrays,
    Deployment,
    ParityReport,
    compare,
    fit_inputs,
    generate_inputs,
    load_deployment,
    read_inputs,
)
from gateway.types import TensorSpec

DEFAULT_RECORD_DIR = Path(".modelyard/recorded")
# Recorded requests read at most, the first by name (the gateway names them <pid>-<seq>.npz).
MAX_RECORDED = 200

Outputs = dict[str, np.ndarray[Any, Any]]
RunAsync = Callable[[Arrays], Awaitable[Outputs]]


class CheckRefused(MigrationError):
    """The new deployment's outputs differ from the source's by more than the tolerance."""


@dataclass(frozen=True, slots=True)
class Worst:
    value: float
    output: str
    version: int


@dataclass(slots=True)
class CheckResult:
    model: str
    deployment: str
    atol: float
    rtol: float
    inputs: Inputs
    # How many cases each version ran.
    cases: int
    # (version, case index, the comparison of that case)
    reports: list[tuple[int, int, ParityReport]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(report.ok for _, _, report in self.reports)

    def worst(self, relative: bool) -> Worst:
        found = Worst(0.0, "", 0)
        for version, _, report in self.reports:
            for diff in report.outputs:
                value = diff.max_rel if relative else diff.max_abs
                if value > found.value or not found.output:
                    found = Worst(value, diff.name, version)
        return found

    def tolerance(self) -> str:
        return f"|new - source| <= atol + rtol * |source|, atol={self.atol:g}, rtol={self.rtol:g}"

    def lines(self) -> list[str]:
        """Per version and output: the largest differences over every case, and whether within."""
        out = [
            f"check {self.model} vs {self.deployment}: inputs {self.inputs.detail}, "
            f"{self.cases} case(s) per version",
            f"tolerance: {self.tolerance()}",
        ]
        rows: dict[tuple[int, str], list[float]] = {}
        for version, _, report in self.reports:
            for diff in report.outputs:
                row = rows.setdefault((version, diff.name), [0.0, 0.0, 1.0])
                row[0] = max(row[0], diff.max_abs)
                row[1] = max(row[1], diff.max_rel)
                row[2] = min(row[2], 1.0 if diff.within else 0.0)
        for (version, name), (max_abs, max_rel, within) in sorted(rows.items()):
            out.append(
                f"  version {version} {name}: max abs diff {max_abs:.3e}, max rel diff {max_rel:.3e}"
                f" ({'within' if within else 'OVER'})"
            )
        out.append(self.summary())
        return out

    def summary(self) -> str:
        worst_abs, worst_rel = self.worst(False), self.worst(True)
        where = (
            f"worst abs diff {worst_abs.value:.3e} (output '{worst_abs.output}', version {worst_abs.version}), "
            f"worst rel diff {worst_rel.value:.3e} (output '{worst_rel.output}', version {worst_rel.version})"
        )
        if self.ok:
            return f"PASS  {self.deployment} answers as {self.model}: {where}"
        return (
            f"FAIL  {self.deployment} changes {self.model}'s outputs: {where}, over {self.tolerance()}; "
            f"the conversion is refused: fix it and run `modelyard migrate convert {self.model} --force`"
        )

    def as_step(self) -> dict[str, Any]:
        worst_abs, worst_rel = self.worst(False), self.worst(True)
        return {
            "ok": self.ok,
            "at": time.time(),
            "worst_abs_diff": worst_abs.value,
            "worst_rel_diff": worst_rel.value,
            "worst_abs_output": worst_abs.output,
            "worst_abs_version": worst_abs.version,
            "worst_rel_output": worst_rel.output,
            "worst_rel_version": worst_rel.version,
            "atol": self.atol,
            "rtol": self.rtol,
            "inputs": self.inputs.kind,
            "cases": self.cases,
            "versions": sorted({version for version, _, _ in self.reports}),
        }


def recorded_inputs(record_dir: Path, model: str) -> list[dict[str, np.ndarray[Any, Any]]]:
    """The gateway's recorded requests of the model: one .npz each, keyed by input name."""
    folder = record_dir / model
    files = sorted(folder.glob("*.npz"))[:MAX_RECORDED] if folder.is_dir() else []
    if not files:
        raise MigrationError(
            f"no recorded requests of '{model}' in {folder}: turn recording on with `record:` in its "
            "config.yaml (and the gateway's --record-dir), or check on --inputs FILE.npz or on "
            "generated inputs (neither flag)"
        )
    return [read_inputs(path) for path in files]


@dataclass(frozen=True, slots=True)
class Inputs:
    """The check's cases (None: generated from the source's signature), their kind as the state
    records it (generated, recorded, or the .npz file's path) and how the output names them."""

    cases: list[dict[str, np.ndarray[Any, Any]]] | None
    kind: str
    detail: str


def gather_inputs(
    model: str, inputs: Path | None, recorded: bool, record_dir: Path, batch: int = DEFAULT_BATCH
) -> Inputs:
    if inputs is not None and recorded:
        raise MigrationError("give --inputs FILE.npz or --recorded, not both")
    if inputs is not None:
        return Inputs([read_inputs(inputs)], str(inputs), f"from {inputs}")
    if recorded:
        cases = recorded_inputs(record_dir, model)
        return Inputs(cases, "recorded", f"recorded: {len(cases)} request(s) from {record_dir / model}")
    return Inputs(None, "generated", f"generated from the signature, {batch} row(s)")


@contextlib.contextmanager
def _torch_side(
    entry: ModelEntry, version: int, output_names: Sequence[str]
) -> Iterator[tuple[RunSource, list[TensorSpec]]]:
    artifact = next(v.artifact for v in entry.versions if v.version == version)
    assert artifact is not None and entry.config.inputs
    specs = [decl.spec() for decl in entry.config.inputs]
    with torchscript_file(artifact) as module:
        yield torch_runner(module, [s.name for s in specs], output_names), specs


async def run_check(
    root: Path,
    migration: Migration,
    inputs: Inputs,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    batch: int = DEFAULT_BATCH,
) -> CheckResult:
    """Every version the source serves, run on the same inputs on both sides and compared."""
    if atol < 0 or rtol < 0:
        raise MigrationError(f"tolerances cannot be negative (atol={atol:g}, rtol={rtol:g})")
    entry = source_entry(root, migration.model)
    if not (root / migration.deployment).is_dir():
        raise MigrationError(
            f"the new deployment {root / migration.deployment} is gone: run "
            f"`modelyard migrate convert {migration.model} --to {migration.to}` again"
        )
    converted = migration.steps.get("convert", {}).get("versions")
    versions = [v.version for v in entry.versions]
    if converted is not None and sorted(converted) != versions:
        raise MigrationError(
            f"model '{migration.model}' serves versions {versions} now, but versions {sorted(converted)} were "
            f"converted: run `modelyard migrate convert {migration.model} --to {migration.to} --force` again"
        )
    cases = inputs.cases
    result = CheckResult(
        migration.model, migration.deployment, atol, rtol, inputs, len(cases) if cases else 1
    )
    registry = Registry(root)
    try:
        for version in versions:
            new_adapter, new_signature, new_label = await load_deployment(
                registry, Deployment(migration.deployment, version)
            )
            output_names = [spec.name for spec in new_signature.outputs]
            with contextlib.ExitStack() as stack:
                if entry.backend == "torchserve":
                    run, source_specs = stack.enter_context(_torch_side(entry, version, output_names))
                    source_label = f"{migration.model}:{version} (torch)"
                    source_run = _sync(run)
                else:
                    adapter, signature, source_label = await load_deployment(
                        registry, Deployment(migration.model, version)
                    )
                    source_specs = list(signature.inputs)
                    source_run = _bound(adapter, [spec.name for spec in signature.outputs])
                for index, case in enumerate(cases or [generate_inputs(source_specs, batch)]):
                    expected = await source_run(fit_inputs(case, source_specs, source_label))
                    got = await new_adapter.infer(
                        fit_inputs(case, new_signature.inputs, new_label), output_names
                    )
                    report = compare(expected, got, rtol, atol, source_label, new_label)
                    result.reports.append((version, index, report))
    finally:
        await registry.aclose()
    return result


def _sync(run: RunSource) -> RunAsync:
    async def call(inputs: Arrays) -> Outputs:
        return run(inputs)

    return call


def _bound(adapter: ModelAdapter, outputs: list[str]) -> RunAsync:
    async def call(inputs: Arrays) -> Outputs:
        return await adapter.infer(inputs, outputs)

    return call


def record_check(state_dir: Path, migration: Migration, result: CheckResult) -> None:
    migration.steps["check"] = result.as_step()
    migration.record("check", result.summary(), ok=result.ok)
    state.save(state_dir, migration)
