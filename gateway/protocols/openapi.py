"""The request bodies of the endpoints that read raw bodies, for the OpenAPI document.

FastAPI documents a body only when a route declares a model for it; the infer, predict and index
routes read the raw body themselves (for speed, and for Triton's binary extension), so their
bodies are declared here, once, as `openapi_extra`. A route that moves off FastAPI's routing keeps
the same declaration by passing `request_body(...)` to whatever builds its document.
"""

from __future__ import annotations

from typing import Any

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64"]
DATATYPES += ["FP16", "FP32", "FP64", "BYTES"]

_PARAMETERS: dict[str, Any] = {"type": "object", "additionalProperties": True}
_SHAPE: dict[str, Any] = {"type": "array", "items": {"type": "integer", "minimum": 0}}

# Open Inference Protocol v2, "Inference Request JSON Object"; binary data follows the JSON when
# the Inference-Header-Content-Length header says where the JSON ends.
V2_INFER_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": _PARAMETERS,
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "shape", "datatype"],
                "properties": {
                    "name": {"type": "string"},
                    "shape": _SHAPE,
                    "datatype": {"type": "string", "enum": DATATYPES},
                    "parameters": _PARAMETERS,
                    "data": {"type": "array"},
                },
            },
        },
        "outputs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "parameters": _PARAMETERS},
            },
        },
    },
}

# TF Serving's REST predict request: rows ("instances") or columns ("inputs").
TF_PREDICT_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {
        "signature_name": {"type": "string"},
        "instances": {"type": "array"},
        "inputs": {},
    },
}

V2_REPOSITORY_INDEX_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {"repository_name": {"type": "string"}, "ready": {"type": "boolean"}},
}

# A repository load: `config` is Triton's ModelConfig as a JSON string.
V2_REPOSITORY_LOAD_REQUEST: dict[str, Any] = {
    "type": "object",
    "properties": {"parameters": {"type": "object", "properties": {"config": {"type": "string"}}}},
}


def request_body(schema: dict[str, Any], required: bool = True, binary: bool = False) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of `schema` (and, with `binary`, the binary form)."""
    content: dict[str, Any] = {"application/json": {"schema": schema}}
    if binary:
        content["application/octet-stream"] = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": required, "content": content}}
