"""The TorchServe handler that modelyard ships: named tensors in, named tensors out, in a compact
binary form (no nested JSON lists), with TorchServe-side batching.

This file is packed into each model archive and runs inside TorchServe's Python workers, so it
imports nothing from modelyard; the adapter (`adapters/torchserve/`) imports its codec from here.

Wire format, both ways: a 4-byte little-endian length N, N bytes of JSON header, then each
tensor's raw little-endian bytes in header order. Request header:
{"inputs": [{"name", "datatype", "shape"}], "outputs": [names] or absent}.
Response header: {"outputs": [{"name", "datatype", "shape"}]}; on failure {"error": "..."}.
"""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np

CONTENT_TYPE = "application/x-modelyard-tensors"
SETTINGS_FILE = "modelyard.json"
_LENGTH = struct.Struct("<I")
DTYPES: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "<u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8",
    "INT8": "<i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip
_DATATYPE_OF = {np.dtype(v).newbyteorder("="): k for k, v in DTYPES.items()}


class TensorFormatError(ValueError):
    """A payload that is not in the modelyard tensor format."""


def encode(header: dict[str, Any], arrays: list[np.ndarray[Any, Any]]) -> bytes:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return b"".join(
        [_LENGTH.pack(len(encoded)), encoded, *(np.ascontiguousarray(a).tobytes() for a in arrays)]
    )


def encode_tensors(
    key: str, tensors: dict[str, np.ndarray[Any, Any]], extra: dict[str, Any] | None = None
) -> bytes:
    entries = []
    for name, array in tensors.items():
        datatype = _DATATYPE_OF.get(array.dtype.newbyteorder("="))
        if datatype is None:
            raise TensorFormatError(f"tensor '{name}' has dtype {array.dtype}, which has no v2 datatype here")
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape)})
    return encode({key: entries, **(extra or {})}, list(tensors.values()))


def decode(
    payload: bytes | bytearray | memoryview, key: str
) -> tuple[dict[str, Any], dict[str, np.ndarray[Any, Any]]]:
    view = memoryview(payload)
    if len(view) < 4:
        raise TensorFormatError("payload shorter than its length prefix")
    (length,) = _LENGTH.unpack_from(view, 0)
    if 4 + length > len(view):
        raise TensorFormatError("header length past the end of the payload")
    try:
        header = json.loads(bytes(view[4 : 4 + length]))
    except ValueError as exc:
        raise TensorFormatError(f"header is not JSON: {exc}") from None
    if "error" in header:
        return header, {}
    offset = 4 + length
    tensors: dict[str, np.ndarray[Any, Any]] = {}
    for entry in header.get(key, []):
        name, datatype, shape = entry["name"], entry["datatype"], tuple(entry["shape"])
        if datatype not in DTYPES:
            raise TensorFormatError(f"tensor '{name}': datatype {datatype} cannot be carried to torch")
        dtype = np.dtype(DTYPES[datatype])
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if offset + size > len(view):
            raise TensorFormatError(f"tensor '{name}': data is truncated")
        tensors[name] = np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(shape)
        offset += size
    if offset != len(view):
        raise TensorFormatError(f"{len(view) - offset} bytes left over after the tensors")
    return header, tensors


class ModelyardHandler:
    """Runs a TorchScript module: inputs in declared order as positional arguments."""

    def __init__(self) -> None:
        self.initialized = False

    def initialize(self, context: Any) -> None:
        import torch

        model_dir = Path(context.system_properties["model_dir"])
        settings = json.loads((model_dir / SETTINGS_FILE).read_text())
        self.input_names: list[str] = settings["inputs"]
        self.output_names: list[str] = settings.get("outputs") or []
        torch.set_num_threads(int(settings.get("threads", 1)))
        serialized = context.manifest["model"]["serializedFile"]
        with warnings.catch_warnings():
            # TorchScript is what a model.pt archive holds, whatever torch thinks of it now.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning
            )
            self.module = torch.jit.load(str(model_dir / serialized), map_location="cpu").eval()  # type: ignore[no-untyped-call]
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        responses: list[bytes | None] = [None] * len(data)
        decoded: dict[int, dict[str, np.ndarray[Any, Any]]] = {}
        for index, request in enumerate(data):
            body = request.get("body") if request.get("body") is not None else request.get("data")
            try:
                _, tensors = decode(bytes(body or b""), "inputs")
                missing = [n for n in self.input_names if n not in tensors]
                if missing:
                    raise TensorFormatError(f"missing input(s) {', '.join(missing)}")
                decoded[index] = tensors
            except (TensorFormatError, KeyError, TypeError, ValueError) as exc:
                responses[index] = self._fail(context, index, 400, f"bad request: {exc}")
        for index, outputs in self._run(list(decoded.items()), context).items():
            responses[index] = outputs
        for index in range(len(data)):
            context.set_response_content_type(index, CONTENT_TYPE)
        return [r if r is not None else b"" for r in responses]

    def _run(
        self, requests: list[tuple[int, dict[str, np.ndarray[Any, Any]]]], context: Any
    ) -> dict[int, bytes]:
        if len(requests) > 1 and _stackable(self.input_names, [t for _, t in requests]):
            rows = [next(iter(t.values())).shape[0] for _, t in requests]
            merged = {n: np.concatenate([t[n] for _, t in requests]) for n in self.input_names}
            try:
                outputs = self._forward(merged)
            except Exception:
                outputs = None  # one bad request must not fail its neighbours: run each alone
            if outputs is not None and all(o.ndim and o.shape[0] == sum(rows) for o in outputs.values()):
                bounds = np.cumsum([0, *rows])
                return {
                    index: encode_tensors(
                        "outputs", {n: o[bounds[i] : bounds[i + 1]] for n, o in outputs.items()}
                    )
                    for i, (index, _) in enumerate(requests)
                }
        results = {}
        for index, tensors in requests:
            try:
                results[index] = encode_tensors("outputs", self._forward(tensors))
            except Exception as exc:  # the module rejected this input
                results[index] = self._fail(context, index, 400, f"the model rejected the input: {exc}")
        return results

    def _forward(self, tensors: dict[str, np.ndarray[Any, Any]]) -> dict[str, np.ndarray[Any, Any]]:
        import torch

        args = [torch.from_numpy(np.array(tensors[name])) for name in self.input_names]
        with torch.inference_mode():
            result = self.module(*args)
        values = list(result) if isinstance(result, tuple | list) else [result]
        names = self.output_names or [f"output{i}" for i in range(len(values))]
        if len(names) != len(values):
            raise TensorFormatError(f"the module returned {len(values)} outputs, {len(names)} are declared")
        return {name: value.detach().cpu().numpy() for name, value in zip(names, values, strict=True)}

    @staticmethod
    def _fail(context: Any, index: int, status: int, message: str) -> bytes:
        # The reason phrase travels in TorchServe's own framing: one short line, plain ASCII.
        phrase = " ".join(message.split())[:200].encode("ascii", "replace").decode()
        context.set_response_status(status, phrase, index)
        return encode({"error": message}, [])


def _stackable(names: list[str], requests: list[dict[str, np.ndarray[Any, Any]]]) -> bool:
    first = requests[0]
    for name in names:
        head = first[name]
        if head.ndim == 0:
            return False
        for other in requests[1:]:
            if other[name].dtype != head.dtype or other[name].shape[1:] != head.shape[1:]:
                return False
    rows = [[t[n].shape[0] for n in names] for t in requests]
    return all(len(set(r)) == 1 for r in rows)


_service = ModelyardHandler()


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[bytes] | None:
    """TorchServe's entry point for a module-level handler."""
    if not _service.initialized:
        _service.initialize(context)
    if data is None:
        return None
    return _service.handle(data, context)
