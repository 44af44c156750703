"""Request ids, client timeouts and priorities, read the same way by every protocol."""

from __future__ import annotations

import os
import time

import pytest

from gateway.context import client_deadline, priority, request_id
from gateway.errors import MalformedRequest
from gateway.limits import Priority


def test_request_id_prefers_the_header_then_the_body_then_makes_one() -> None:
    assert request_id("abc", "body-id") == "abc"
    assert request_id(None, "body-id") == "body-id"
    made, other = request_id(None), request_id(None)
    assert len(made) == 16 and made != other
    # An id that could split a header, or one too long to log, is replaced.
    assert request_id("a\r\nSet-Cookie: x") not in ("a\r\nSet-Cookie: x",)
    assert len(request_id("x" * 1000)) == 16


def test_a_forked_worker_makes_other_ids_than_its_parent() -> None:
    # Ids come from the random module's generator, which a forked child seeds afresh: two workers
    # forked from one supervisor must not hand out the same ids.
    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write, request_id(None).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    with os.fdopen(read, "rb") as pipe:
        childs = pipe.read().decode()
    assert len(childs) == 16 and int(childs, 16) >= 0
    assert childs != request_id(None)


def test_client_deadline_from_header_or_triton_parameter() -> None:
    now = time.monotonic()
    header = client_deadline({"x-timeout-ms": "250"}, {})
    assert header is not None and now + 0.24 < header < time.monotonic() + 0.26
    parameter = client_deadline({}, {"timeout": 100_000})  # microseconds, as tritonclient sends it
    assert parameter is not None and parameter < time.monotonic() + 0.11
    both = client_deadline({"x-timeout-ms": "5000"}, {"timeout": 100_000})
    assert both is not None and both < time.monotonic() + 0.11
    assert client_deadline({}, {}) is None


@pytest.mark.parametrize(
    ("headers", "parameters", "message"),
    [
        ({"x-timeout-ms": "soon"}, {}, "milliseconds"),
        ({"x-timeout-ms": "0"}, {}, "positive"),
        ({}, {"timeout": "1s"}, "microseconds"),
    ],
)
def test_bad_timeouts_are_clear_errors(
    headers: dict[str, str], parameters: dict[str, object], message: str
) -> None:
    with pytest.raises(MalformedRequest, match=message):
        client_deadline(headers, parameters)


def test_priority_from_header_or_triton_parameter() -> None:
    assert priority({"x-priority": "HIGH"}, "x-priority", {}) is Priority.HIGH
    assert priority({"x-priority": "low"}, "x-priority", {"priority": 1}) is Priority.LOW
    assert priority({}, "x-priority", {"priority": 1}) is Priority.HIGH
    assert priority({}, "x-priority", {"priority": 0}) is Priority.NORMAL
    assert priority({}, "x-priority", {"priority": 7}) is Priority.LOW
    assert priority({}, "x-priority", {}) is Priority.NORMAL
    with pytest.raises(MalformedRequest, match="high, normal or low"):
        priority({"x-priority": "urgent"}, "x-priority", {})


def test_the_rest_fast_path_reads_headers_once_and_a_repeated_one_counts_by_its_first_value() -> None:
    from starlette.datastructures import Headers

    from gateway.protocols.http import header_dict

    raw = [(b"x-request-id", b"first"), (b"x-timeout-ms", b"50"), (b"x-request-id", b"second")]
    scope = {"type": "http", "headers": raw}
    headers = header_dict(scope)
    assert headers == {"x-request-id": "first", "x-timeout-ms": "50"}
    assert headers["x-request-id"] == Headers(scope=scope).get("x-request-id")
