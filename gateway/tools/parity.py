"""Parity: run the same inputs through two deployments and measure how far their outputs differ.

The comparison functions are pure (numpy in, report out); `run_parity` loads both sides with the
real adapters through a `Registry`, so what is compared is what the gateway would serve.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from adapters import ModelAdapter
from gateway import samples
from gateway.config import preferred_version
from gateway.errors import GatewayError, ModelNotReady
from gateway.registry import Registry
from gateway.samples import SampleError
from gateway.tools.errors import ToolError
from gateway.types import ModelSignature, TensorSpec

Arrays = Mapping[str, np.ndarray[Any, Any]]

# float32 kernels on two runtimes reorder sums differently; these bounds accept that and no more.
DEFAULT_RTOL = 1e-4
DEFAULT_ATOL = 1e-5
DEFAULT_BATCH = 4
SEED = samples.SEED


class ParityUsageError(ToolError):
    """The parity check was asked for something it cannot do: bad flags, unknown models, bad inputs."""


class ParityMismatch(ToolError):
    """The two sides cannot be compared output for output: their output names or shapes differ."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """One side of a comparison: a model in the repository, and a version (None: its default)."""

    model: str
    version: int | None = None

    def __str__(self) -> str:
        return self.model if self.version is None else f"{self.model}:{self.version}"


@dataclass(frozen=True, slots=True)
class OutputDiff:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float
    within: bool


@dataclass(frozen=True, slots=True)
class ParityReport:
    left: str
    right: str
    outputs: tuple[OutputDiff, ...]
    rtol: float
    atol: float

    @property
    def ok(self) -> bool:
        return all(diff.within for diff in self.outputs)

    def verdict(self) -> str:
        sides = f"{self.left} vs {self.right}"
        bounds = f"rtol={self.rtol:g}, atol={self.atol:g}"
        if self.ok:
            return f"PASS  {sides}: every output within {bounds}"
        over = ", ".join(d.name for d in self.outputs if not d.within)
        return f"FAIL  {sides}: {over} over {bounds}"

    def table(self) -> str:
        rows = [("output", "shape", "max abs diff", "max rel diff", "within")]
        rows += [
            (
                d.name,
                "x".join(map(str, d.shape)),
                f"{d.max_abs:.3e}",
                f"{d.max_rel:.3e}",
                "yes" if d.within else "NO",
            )
            for d in self.outputs
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
        )


def parse_deployment(text: str) -> Deployment:
    """`name` or `name:version`."""
    name, sep, version = text.strip().partition(":")
    if not name or (sep and not version.isdigit()):
        raise ParityUsageError(f"'{text}' is not a deployment: write MODEL or MODEL:VERSION (a number)")
    return Deployment(name, int(version) if sep else None)


def parse_sides(model: str, versions: str | None, deployments: str | None) -> tuple[Deployment, Deployment]:
    """The two sides from the command's flags: two versions of MODEL, or two deployments."""
    if versions and deployments:
        raise ParityUsageError("give --versions or --deployments, not both")
    if deployments:
        parts = [p for p in deployments.split(",") if p.strip()]
        if len(parts) != 2:
            raise ParityUsageError(
                f"--deployments takes two deployments, like {model},other:1; got '{deployments}'"
            )
        left, right = (parse_deployment(p) for p in parts)
        if left.model != model:
            raise ParityUsageError(
                f"--deployments must start with MODEL '{model}'; it starts with '{left.model}'"
            )
        return left, right
    if versions:
        parts = [p.strip() for p in versions.split(",") if p.strip()]
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ParityUsageError(f"--versions takes two version numbers, like 1,2; got '{versions}'")
        return Deployment(model, int(parts[0])), Deployment(model, int(parts[1]))
    raise ParityUsageError("give the two sides: --versions A,B or --deployments X,Y")


def generate_inputs(
    specs: Sequence[TensorSpec], batch: int = DEFAULT_BATCH, seed: int = SEED
) -> dict[str, np.ndarray[Any, Any]]:
    """Reproducible inputs for a signature: -1 dimensions become `batch`."""
    if batch < 1:
        raise ParityUsageError(f"--batch must be at least 1, not {batch}")
    try:
        return samples.generate_inputs(specs, batch, seed, hint="give the inputs with --inputs FILE.npz")
    except SampleError as exc:
        raise ParityUsageError(str(exc)) from exc


def read_inputs(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays from an .npz file, keyed by input name."""
    try:
        return samples.read_inputs(path)
    except SampleError as exc:
        raise ParityUsageError(str(exc)) from exc


def fit_inputs(inputs: Arrays, specs: Sequence[TensorSpec], side: str) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs checked against one side's signature, cast to its datatypes where that loses no kind."""
    try:
        return samples.fit_inputs(inputs, specs, side)
    except SampleError as exc:
        raise ParityUsageError(str(exc)) from exc


def diff_output(
    name: str, left: np.ndarray[Any, Any], right: np.ndarray[Any, Any], rtol: float, atol: float
) -> OutputDiff:
    """The largest differences of one output, `left` being the reference (as in numpy.isclose's `b`)."""
    if left.shape != right.shape:
        raise ParityMismatch(
            f"output '{name}' has shape {list(left.shape)} on one side and {list(right.shape)} on the other"
        )
    if left.dtype.kind in "OSU" or right.dtype.kind in "OSU":
        same = bool(np.array_equal(left, right))
        return OutputDiff(
            name, left.shape, 0.0 if same else float("inf"), 0.0 if same else float("inf"), same
        )
    reference = left.astype(np.float64)
    other = right.astype(np.float64)
    both_nan = np.isnan(reference) & np.isnan(other)
    diff = np.where(both_nan, 0.0, np.abs(other - reference))
    diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is as far as it gets
    size = np.abs(reference)
    rel = np.divide(diff, size, out=np.zeros_like(diff), where=size > 0)
    within = bool(np.all(diff <= atol + rtol * np.where(np.isnan(size), 0.0, size)))
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float(rel.max()) if rel.size else 0.0
    return OutputDiff(name, left.shape, max_abs, max_rel, within)


def compare(
    left: Arrays,
    right: Arrays,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    left_name: str = "left",
    right_name: str = "right",
) -> ParityReport:
    """Outputs compared by name; a name on one side only is a mismatch."""
    only_left = sorted(set(left) - set(right))
    only_right = sorted(set(right) - set(left))
    if only_left or only_right:
        parts = [f"{', '.join(only_left)} only on {left_name}"] if only_left else []
        parts += [f"{', '.join(only_right)} only on {right_name}"] if only_right else []
        raise ParityMismatch(f"the two sides' outputs differ by name: {'; '.join(parts)}")
    diffs = tuple(
        diff_output(name, np.asarray(left[name]), np.asarray(right[name]), rtol, atol)
        for name in sorted(left)
    )
    return ParityReport(left_name, right_name, diffs, rtol, atol)


async def run_parity(
    root: Path,
    left: Deployment,
    right: Deployment,
    inputs: Arrays | None = None,
    batch: int = DEFAULT_BATCH,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """Load both sides from the repository with their real backends, run the same inputs, compare."""
    if not root.is_dir():
        raise ParityUsageError(f"{root} is not a folder")
    if rtol < 0 or atol < 0:
        raise ParityUsageError(f"tolerances cannot be negative (rtol={rtol:g}, atol={atol:g})")
    registry = Registry(root)
    try:
        outputs: list[dict[str, np.ndarray[Any, Any]]] = []
        names: list[str] = []
        for side in (left, right):
            adapter, signature, label = await load_deployment(registry, side)
            if inputs is None:
                inputs = generate_inputs(signature.inputs, batch)
            fitted = fit_inputs(inputs, signature.inputs, label)
            outputs.append(await adapter.infer(fitted, [spec.name for spec in signature.outputs]))
            names.append(label)
        return compare(outputs[0], outputs[1], rtol, atol, names[0], names[1])
    finally:
        await registry.aclose()


async def load_deployment(registry: Registry, side: Deployment) -> tuple[ModelAdapter, ModelSignature, str]:
    """A ready version of a model (loading it if needed), its signature, and a `model:version` label."""
    try:
        model = registry.get(side.model)
    except GatewayError:
        try:
            model = await registry.load(side.model)
        except ModelNotReady:
            model = registry.get(side.model)  # some versions may have loaded; the check below says
        except GatewayError as exc:
            raise ParityUsageError(str(exc)) from exc
    version = side.version
    if version is None:
        version = preferred_version(model.entry.config, model.ready_versions)
        if version is None:
            raise ModelNotReady(f"model '{side.model}' has no version that loaded: {model.reason}")
    loaded = model.versions.get(version)
    if loaded is None:
        known = ", ".join(str(v) for v in sorted(model.versions)) or "none"
        raise ParityUsageError(f"model '{side.model}' has no version {version} (loaded versions: {known})")
    if not loaded.ready or loaded.adapter is None or loaded.signature is None:
        raise ModelNotReady(f"model '{side.model}' version {version} did not load: {loaded.reason}")
    return loaded.adapter, loaded.signature, f"{side.model}:{version}"
