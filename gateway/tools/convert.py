"""Conversion to ONNX: a TorchScript module or a SavedModel becomes a new ONNX version of a model,
then the parity check compares it with its source.

The source runs in-process with the framework that wrote it (torch, or the TensorFlow adapter), and
the new version runs through a `Registry` with the real ONNX Runtime adapter, as the gateway will serve it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gateway.config import ConfigError, ModelConfig, load_model_config
from gateway.registry import Registry
from gateway.repository import CONFIG_FILE, is_model_name, scan_model
from gateway.tools.errors import ToolError
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
)
from gateway.types import Datatype, TensorSpec

SourceFormat = Literal["torchscript", "savedmodel"]
FORMATS: tuple[SourceFormat, ...] = ("torchscript", "savedmodel")
DEFAULT_OPSET = 17
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts")

RunSource = Callable[[Arrays], dict[str, np.ndarray[Any, Any]]]


class ConvertError(ToolError):
    """The source cannot be converted, or the result cannot be written where it was asked to go."""


@dataclass(frozen=True, slots=True)
class Converted:
    model: str
    version: int
    path: Path
    source_format: SourceFormat


def detect_format(source: Path, given: str | None) -> SourceFormat:
    """The source's format, from --from or from what the path holds."""
    if given is not None:
        if given not in FORMATS:
            raise ConvertError(f"--from must be one of {', '.join(FORMATS)}, not '{given}'")
        return given
    if source.is_file() and source.suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if source.name == "saved_model.pb" or (source / "saved_model.pb").is_file():
        return "savedmodel"
    raise ConvertError(
        f"cannot tell what {source} is: expected a TorchScript file ({', '.join(TORCHSCRIPT_SUFFIXES)}) "
        "or a SavedModel folder; say which with --from"
    )


def next_version(model_dir: Path) -> int:
    """One above the highest numeric version folder, or 1."""
    found = (
        [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        if model_dir.is_dir()
        else []
    )
    return max(found, default=0) + 1


def source_config(source: Path) -> ModelConfig | None:
    """The config.yaml of the model the source belongs to, when it sits in a repository
    (`DIR/MODEL/N/artifact`)."""
    if not source.parent.name.isdigit():
        return None
    path = source.parent.parent / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        return load_model_config(path)
    except ConfigError as exc:
        raise ConvertError(f"cannot read {path}: {exc}") from exc


def torch_signature(
    config: ModelConfig | None, input_shapes: Sequence[Sequence[int]]
) -> tuple[tuple[TensorSpec, ...], tuple[str, ...] | None]:
    """Inputs (names, datatypes, shapes) and output names for the export: `input0..` (FP32) from
    --input-shape when given, with `output0..`; else the source's config.yaml."""
    if input_shapes:
        inputs = tuple(
            TensorSpec(f"input{i}", Datatype.FP32, tuple(int(d) for d in shape))
            for i, shape in enumerate(input_shapes)
        )
        return inputs, None
    if config is None or not config.inputs:
        raise ConvertError(
            "a TorchScript file does not say its input shapes: give --input-shape (like -1,64, once per input) "
            "or convert from a model folder whose config.yaml declares `inputs`"
        )
    outputs = tuple(d.name for d in config.outputs) if config.outputs else None
    return tuple(decl.spec() for decl in config.inputs), outputs


def _example(specs: Sequence[TensorSpec], batch: int) -> list[np.ndarray[Any, Any]]:
    arrays = generate_inputs(specs, batch)
    return [arrays[spec.name] for spec in specs]


def export_torchscript(
    source: Path, target: Path, inputs: Sequence[TensorSpec], output_names: Sequence[str] | None, opset: int
) -> tuple[str, ...]:
    """torch.onnx.export of a TorchScript module, the first dimension of every tensor dynamic.
    Returns the output names used."""
    try:
        import torch
    except ImportError as exc:
        raise ConvertError("converting TorchScript needs torch: pip install 'modelyard[convert]'") from exc
    module = _load_torchscript(source)
    example = tuple(torch.from_numpy(a) for a in _example(inputs, 2))
    with torch.no_grad():
        produced = module(*example)
    count = len(produced) if isinstance(produced, tuple | list) else 1
    names = tuple(output_names) if output_names else tuple(f"output{i}" for i in range(count))
    if len(names) != count:
        raise ConvertError(
            f"{source} returns {count} output(s); config.yaml names {len(names)}: {', '.join(names)}"
        )
    dynamic = {name: {0: "batch"} for name in (*(s.name for s in inputs), *names)}
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13 deprecates the TorchScript-based exporter in favour of dynamo, which cannot
            # take a ScriptModule (what model.pt is); this is the exporter that reads one.
            warnings.filterwarnings(
                "ignore",
                message=r"You are using the legacy TorchScript-based ONNX export",
                category=DeprecationWarning,
            )
            # ...and that exporter calls helpers of its own that torch marks deprecated since 2.7.
            warnings.filterwarnings(
                "ignore",
                message=r"The feature will be removed\. Please remove usage of this function",
                category=DeprecationWarning,
            )
            # A ScriptModule has no Python signature to match keyword inputs against; ours are positional.
            warnings.filterwarnings(
                "ignore",
                message=r"no signature found for .*, skipping _decide_input_format",
                category=UserWarning,
            )
            torch.onnx.export(
                module,
                example,
                str(target),
                input_names=[s.name for s in inputs],
                output_names=list(names),
                dynamic_axes=dynamic,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:  # the exporter fails with many unrelated types
        raise ConvertError(f"torch.onnx.export failed for {source}: {exc}") from exc
    return names


def _load_torchscript(source: Path) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            # TorchScript is deprecated in torch 2.13, yet it is the format model.pt files are in.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
            )
            return torch.jit.load(str(source), map_location="cpu").eval()  # type: ignore[no-untyped-call]
    except Exception as exc:  # a bad file surfaces as RuntimeError or ValueError, depending on how it is bad
        raise ConvertError(f"torch cannot load {source} as TorchScript: {exc}") from exc


def torch_runner(source: Path, input_names: Sequence[str], output_names: Sequence[str]) -> RunSource:
    """Runs the TorchScript module in-process, inputs in `input_names` order."""
    import torch

    module = _load_torchscript(source)

    def run(inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
        try:
            with torch.no_grad():
                produced = module(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in input_names))
        except Exception as exc:  # the module's own errors, in whatever type its code raised
            raise ConvertError(f"{source} failed on the check's inputs: {exc}") from exc
        values = produced if isinstance(produced, tuple | list) else (produced,)
        return {name: value.numpy() for name, value in zip(output_names, values, strict=True)}

    return run


def export_savedmodel(source: Path, target: Path, opset: int) -> None:
    """tf2onnx's converter, run as its own process: it keeps TensorFlow's graph state out of this one."""
    if importlib.util.find_spec("tf2onnx") is None:
        raise ConvertError("converting a SavedModel needs tf2onnx: pip install 'modelyard[convert]'")
    folder = source.parent if source.name == "saved_model.pb" else source
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(folder), "--output", str(target)]
    command += ["--opset", str(opset)]
    result = subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False
    )
    if result.returncode != 0 or not target.is_file():
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
        raise ConvertError(f"tf2onnx could not convert {folder}:\n{tail}")


def _target(root: Path, model: str, version: int | None) -> tuple[int, Path]:
    if not is_model_name(model):
        raise ConvertError(f"'{model}' is not a model name")
    if not root.is_dir():
        raise ConvertError(f"{root} is not a folder")
    model_dir = root / model
    if model_dir.is_dir():
        entry = scan_model(root, model)
        if entry.backend not in (None, "onnxruntime"):
            raise ConvertError(
                f"model '{model}' in {root} is served by {entry.backend}; an ONNX version cannot join it: "
                "give --name a model of its own"
            )
    chosen = version if version is not None else next_version(model_dir)
    if chosen < 1:
        raise ConvertError(f"--version must be at least 1, not {chosen}")
    folder = model_dir / str(chosen)
    if folder.exists():
        raise ConvertError(
            f"{folder} already exists; pick another --version, or leave it out for the next one"
        )
    return chosen, folder / "model.onnx"


def convert(
    source: Path,
    root: Path,
    model: str,
    version: int | None = None,
    source_format: str | None = None,
    opset: int = DEFAULT_OPSET,
    input_shapes: Sequence[Sequence[int]] = (),
) -> tuple[Converted, RunSource | None]:
    """Write `root/model/<N>/model.onnx` from the source, and return a runner of the source for the
    parity check (None for a SavedModel, whose check loads it with the TensorFlow adapter)."""
    if not source.exists():
        raise ConvertError(f"{source} does not exist")
    kind = detect_format(source, source_format)
    chosen, target = _target(root, model, version)
    new_model = not target.parent.parent.exists()
    try:
        if kind == "torchscript":
            inputs, output_names = torch_signature(source_config(source), input_shapes)
            names = export_torchscript(source, target, inputs, output_names, opset)
            runner: RunSource | None = torch_runner(source, [s.name for s in inputs], names)
        else:
            export_savedmodel(source, target, opset)
            runner = None
    except BaseException:
        # A half-written version folder would be served on the next load: only a finished one stays.
        shutil.rmtree(target.parent.parent if new_model else target.parent, ignore_errors=True)
        raise
    return Converted(model, chosen, target, kind), runner


async def check_conversion(
    converted: Converted,
    root: Path,
    source: Path,
    runner: RunSource | None,
    batch: int = DEFAULT_BATCH,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
) -> ParityReport:
    """The parity check between the source and the new ONNX version, on inputs generated from the
    new version's metadata."""
    registry = Registry(root)
    try:
        adapter, signature, label = await load_deployment(
            registry, Deployment(converted.model, converted.version)
        )
        inputs = generate_inputs(signature.inputs, batch)
        outputs = await adapter.infer(inputs, [spec.name for spec in signature.outputs])
        if runner is not None:
            expected = runner(inputs)
            source_label = f"{source} (torch)"
        else:
            expected = await _run_savedmodel(source, inputs)
            source_label = f"{source} (tensorflow)"
        return compare(expected, outputs, rtol, atol, source_label, f"{label} (onnxruntime)")
    finally:
        await registry.aclose()


async def _run_savedmodel(source: Path, inputs: Arrays) -> dict[str, np.ndarray[Any, Any]]:
    """The SavedModel's every output on the inputs, through the in-process TensorFlow adapter."""
    from adapters import LoadSpec, create_adapter

    spec = LoadSpec("source", 1, source.parent, source, ModelConfig())
    async with create_adapter("tensorflow", spec) as adapter:
        signature = await adapter.metadata()
        fitted = fit_inputs(inputs, signature.inputs, str(source))
        return await adapter.infer(fitted, [spec.name for spec in signature.outputs])
