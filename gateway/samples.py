"""Example inputs for a model: generated from its signature, or read from an .npz file; and the
warmup that runs them when a version loads, before it turns ready.

Serving code (the registry's warmup) and the tools (parity, convert, bench) share these.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from gateway.errors import GatewayError, ModelNotReady
from gateway.types import Datatype, ModelSignature, TensorSpec, numpy_dtype

if TYPE_CHECKING:
    from adapters.base import ModelAdapter
    from gateway.config import Warmup

Arrays = Mapping[str, np.ndarray[Any, Any]]

SEED = 0


class SampleError(ValueError):
    """Inputs that cannot be generated, read, or fitted to a signature."""


def generate_inputs(
    specs: Sequence[TensorSpec],
    batch: int = 1,
    seed: int = SEED,
    hint: str = "give example inputs in an .npz file",
) -> dict[str, np.ndarray[Any, Any]]:
    """Reproducible inputs for a signature: -1 dimensions become `batch`."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray[Any, Any]] = {}
    for spec in specs:
        shape = tuple(batch if d == -1 else d for d in spec.shape)
        dtype = numpy_dtype(spec.datatype)
        if spec.datatype is Datatype.BYTES:
            raise SampleError(f"input '{spec.name}' is BYTES, which cannot be generated: {hint}")
        if spec.datatype is Datatype.BOOL:
            arrays[spec.name] = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind == "f":
            arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            low = 0 if dtype.kind == "u" else -5
            arrays[spec.name] = rng.integers(low, 10, shape).astype(dtype)
    return arrays


def read_inputs(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays from an .npz file, keyed by input name."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise SampleError(f"cannot read inputs from {path}: {exc}") from exc


def fit_inputs(inputs: Arrays, specs: Sequence[TensorSpec], side: str) -> dict[str, np.ndarray[Any, Any]]:
    """The inputs checked against one side's signature, cast to its datatypes where that loses no kind."""
    wanted = {spec.name: spec for spec in specs}
    missing = sorted(set(wanted) - set(inputs))
    extra = sorted(set(inputs) - set(wanted))
    if missing or extra:
        problems = [f"missing {', '.join(missing)}"] if missing else []
        problems += [f"unknown {', '.join(extra)}"] if extra else []
        raise SampleError(
            f"inputs do not fit {side}: {'; '.join(problems)} (its inputs are {', '.join(wanted)})"
        )
    fitted: dict[str, np.ndarray[Any, Any]] = {}
    for name, spec in wanted.items():
        array = np.asarray(inputs[name])
        if not spec.accepts_shape(tuple(array.shape)):
            raise SampleError(
                f"input '{name}' has shape {list(array.shape)}; {side} takes {list(spec.shape)}"
            )
        if spec.datatype is Datatype.BYTES:
            fitted[name] = _as_bytes(array, name, side)
            continue
        dtype = numpy_dtype(spec.datatype)
        if not np.can_cast(array.dtype, dtype, "same_kind"):
            raise SampleError(f"input '{name}' is {array.dtype}; {side} takes {spec.datatype}")
        fitted[name] = array.astype(dtype, copy=False)
    return fitted


def _as_bytes(array: np.ndarray[Any, Any], name: str, side: str) -> np.ndarray[Any, Any]:
    """A BYTES tensor as the gateway carries it: an object array of bytes. An .npz holds strings as
    fixed-width bytes or unicode, since object arrays would need pickle to load."""
    if array.dtype.kind == "S":
        return np.array([bytes(v) for v in array.ravel()], dtype=object).reshape(array.shape)
    if array.dtype.kind == "U":
        return np.array([str(v).encode() for v in array.ravel()], dtype=object).reshape(array.shape)
    raise SampleError(f"input '{name}' is {array.dtype}; {side} takes BYTES (strings)")


def warmup_requests(warmup: Warmup, signature: ModelSignature, folder: Path, label: str) -> list[Arrays]:
    """The inputs of each warmup request: one per sample file, or one generated from the signature."""
    try:
        if warmup.samples:
            return [
                fit_inputs(read_inputs(folder / name), signature.inputs, label) for name in warmup.samples
            ]
        return [generate_inputs(signature.inputs, warmup.batch, hint="list samples (.npz) under warmup")]
    except SampleError as exc:
        raise ModelNotReady(f"{label}: warmup: {exc}") from exc


async def warm_up(
    adapter: ModelAdapter, signature: ModelSignature, warmup: Warmup, folder: Path, label: str
) -> None:
    """Runs each warmup request `warmup.runs` times on the adapter. A failure fails the load: a
    version that cannot answer its own examples is not ready."""
    outputs = [spec.name for spec in signature.outputs]
    for inputs in warmup_requests(warmup, signature, folder, label):
        for _ in range(warmup.runs):
            try:
                await adapter.infer(inputs, outputs)
            except GatewayError as exc:
                raise ModelNotReady(f"{label}: warmup failed: {exc}") from exc
