"""A large `ModelInferRequest` read without copying its raw contents again.

protobuf's Python (upb) copies a bytes field each time it is read, so `raw_input_contents[i]`
of a 1 MiB tensor is a fresh 1 MiB allocation and copy per read, on the event loop. For a
request at least LARGE_BYTES long, the wire format's top-level fields are walked here instead:
`raw_input_contents` (field 7) become views of the bytes gRPC received, and every other field is
parsed by protobuf, as the whole message would be (a message is the merge of its fields).
Smaller requests are parsed as they always were: there the walk would cost more than the copy.
"""

from __future__ import annotations

from typing import Any

from tritonclient.grpc import service_pb2

# Below this, protobuf parses the whole message: copying its raw contents costs less than the walk.
LARGE_BYTES = 64 * 1024

# The most top-level fields walked in Python: past it, protobuf parses the whole message, so a
# message of many small fields costs the loop no more than it did.
MAX_FIELDS = 256
_RAW_INPUT_CONTENTS = 7
_LENGTH_DELIMITED = 2
_parse = service_pb2.ModelInferRequest.FromString


class LargeInferRequest:
    """A ModelInferRequest whose `raw_input_contents` are memoryviews of the received bytes; any
    other attribute is the parsed message's."""

    __slots__ = ("message", "raw_input_contents")

    def __init__(self, message: Any, raw_input_contents: list[memoryview]) -> None:
        self.message = message
        self.raw_input_contents = raw_input_contents

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)


class _NotWire(Exception):
    """Not for the walk: not a protobuf message (protobuf's own parser says what is wrong), or one
    of more fields than it takes."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _NotWire
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def parse_infer_request(data: bytes) -> Any:
    """The ModelInferRequest in `data`: the message itself, or for a large one a LargeInferRequest."""
    if len(data) < LARGE_BYTES:
        return _parse(data)
    try:
        return _split(data)
    except _NotWire:
        return _parse(data)


def _split(data: bytes) -> LargeInferRequest:
    view = memoryview(data)
    raw: list[memoryview] = []
    message = service_pb2.ModelInferRequest()
    pos, end, rest = 0, len(data), 0  # rest: where the fields not yet parsed begin
    fields = 0
    while pos < end:
        fields += 1
        if fields > MAX_FIELDS:
            raise _NotWire
        start = pos
        tag, pos = _varint(data, pos)
        wire = tag & 7
        if wire == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            pos += length
        elif wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups, or not protobuf
            raise _NotWire
        if pos > end:
            raise _NotWire
        if tag >> 3 == _RAW_INPUT_CONTENTS and wire == _LENGTH_DELIMITED:
            if rest < start:
                message.MergeFromString(view[rest:start])
            raw.append(view[pos - length : pos])
            rest = pos
    if rest < end:
        message.MergeFromString(view[rest:end])
    return LargeInferRequest(message, raw)
