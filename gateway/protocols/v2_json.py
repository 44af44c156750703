"""Large v2 JSON bodies, read without a Python object per tensor element.

orjson turns `"data": [0.5, 0.25, ...]` into a list of Python floats, about 32 bytes each, which
for short numbers is several times the body. So in a large body each flat numeric `data` array is
cut out before orjson reads the rest (the header, small), and left in place in the body; the
decoder reads it later, a piece at a time, straight into the tensor's numpy array
(gateway/codec.py, `tensor_from_json_array`). In the header each cut array is a placeholder string
that no valid request can hold where a `data` list belongs.
"""

from __future__ import annotations

import re

from gateway.codec import JsonArray

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
