"""REST JSON bodies: inflated within their limit, parsed with a bounded depth, and large v2
bodies read without a Python object per tensor element.

orjson turns `"data": [0.5, 0.25, ...]` into a list of Python floats, about 32 bytes each, which
for short numbers is several times the body. So in a large body each flat numeric `data` array is
cut out before orjson reads the rest (the header, small), and left in place in the body; the
decoder reads it later, a piece at a time, straight into the tensor's numpy array
(gateway/codec.py, `tensor_from_json_array`). In the header each cut array is a placeholder string
that no valid request can hold where a `data` list belongs.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import orjson

from gateway.codec import DEFAULT_LIMITS, InputLimits, JsonArray, body_limit
from gateway.errors import MalformedRequest, PayloadTooLarge, Unsupported
from gateway.types import quoted

# Bodies under this are parsed whole: the cut costs more than it saves on small requests.
SPLIT_FROM_BYTES = 256 << 10
# Shorter arrays stay in the header.
MIN_ARRAY_BYTES = 4 << 10
_DATA_LIST = re.compile(rb'"data"\s*:\s*\[')
_PLACEHOLDER = "\x00data "


def split_data_arrays(body: bytes | bytearray) -> tuple[bytes | bytearray, dict[str, JsonArray]]:
    """The body with each long flat `data` array replaced by a placeholder, and the arrays by
    placeholder. A `data` array holding lists, objects or strings is left where it is."""
    if len(body) < SPLIT_FROM_BYTES:
        return body, {}
    view = memoryview(body)
    pieces: list[bytes | memoryview] = []
    arrays: dict[str, JsonArray] = {}
    done = 0
    for match in _DATA_LIST.finditer(body):
        start = match.end()
        if start <= done:
            continue
        end = body.find(b"]", start)
        if end < 0:
            break
        if (
            end - start < MIN_ARRAY_BYTES
            or body.find(b"[", start, end) >= 0
            or body.find(b"{", start, end) >= 0
            or body.find(b'"', start, end) >= 0
        ):
            continue
        key = f"{_PLACEHOLDER}{len(arrays)}"
        pieces += [view[done : start - 1], b'"\\u0000data %d"' % len(arrays)]
        arrays[key] = JsonArray(body, start, end)
        done = end + 1
    if not arrays:
        return body, {}
    pieces.append(view[done:])
    return b"".join(pieces), arrays


def is_placeholder(value: object) -> bool:
    return isinstance(value, str) and value.startswith(_PLACEHOLDER)


def decompress(
    body: bytes | bytearray, encoding: str | None, limits: InputLimits = DEFAULT_LIMITS, binary: bool = False
) -> bytes | bytearray:
    """The body inflated, never past its limit: a small gzip bomb is refused, not inflated."""
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise Unsupported(f"Content-Encoding {quoted(encoding)} is not supported; use gzip or deflate")
    limit, setting = body_limit(limits, binary)
    # wbits 16+MAX_WBITS reads a gzip header and trailer, MAX_WBITS a zlib stream.
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedRequest(f"the body is not valid {encoding} data: {exc}") from None
    if len(inflated) > limit:
        raise PayloadTooLarge(f"the {encoding} body inflates to more than {limit} bytes ({setting})")
    if not inflater.eof:
        raise MalformedRequest(f"the body is not valid {encoding} data: the stream is truncated")
    return inflated


def json_object(data: bytes | bytearray | memoryview, limits: InputLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise MalformedRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise MalformedRequest("the body must be a JSON object")
    check_json_depth(data, parsed, limits.max_json_depth)
    return parsed


def check_json_depth(data: bytes | bytearray | memoryview, parsed: Any, max_depth: int) -> None:
    """Refuses JSON nested deeper than `max_depth`.

    The number of '[' and '{' bytes bounds the depth and costs one C-speed pass, so a body with
    flat tensor data (what tritonclient sends) is never walked; only a body with more brackets than
    the limit is, without recursion.
    """
    raw = bytes(data) if isinstance(data, memoryview) else data
    if raw.count(b"[") + raw.count(b"{") <= max_depth:
        return
    level: list[Any] = [parsed]
    for depth in range(1, max_depth + 2):
        if depth > max_depth:
            raise MalformedRequest(
                f"the JSON body is nested deeper than {max_depth} levels (MODELYARD_MAX_JSON_DEPTH)"
            )
        children: list[Any] = []
        for node in level:
            values = node.values() if isinstance(node, dict) else node
            children.extend(v for v in values if isinstance(v, dict | list))
        if not children:
            return
        level = children
