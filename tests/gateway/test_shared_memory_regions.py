"""The gateway's shared-memory regions on real POSIX shared-memory objects: what a client that
rewrites or shrinks its object while a request is in flight can and cannot do to the gateway."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from gateway.codec import InputLimits
from gateway.errors import InvalidInput, Overloaded, PayloadTooLarge, SharedMemoryError
from gateway.limits import BodyBudget
from gateway.protocols import shared_memory
from gateway.protocols.shared_memory import BYTE_SIZE, REGION, SHM_ROOT, SharedMemoryRegions
from gateway.protocols.v2_grpc import decode_infer_request
from gateway.types import Datatype, Tensor

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def key(request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"modelyard_test_{os.getpid()}_{request.node.name[:40]}"
    yield f"/{name}"
    (SHM_ROOT / name).unlink(missing_ok=True)


def _object(key: str, data: bytes) -> Path:
    path = SHM_ROOT / key.lstrip("/")
    path.write_bytes(data)
    return path


def _regions(key: str, size: int) -> SharedMemoryRegions:
    regions = SharedMemoryRegions(enabled=True)
    regions.register("r", key, 0, size)
    return regions


def test_an_input_read_from_a_region_survives_its_object_shrinking(key: str) -> None:
    """The input is read out of the object: a client that truncates the object while the request
    is in flight cannot make the gateway read past its end (SIGBUS, which would kill the process)."""
    script = textwrap.dedent(
        f"""
        import os
        import numpy as np
        from gateway.protocols.shared_memory import BYTE_SIZE, REGION, SHM_ROOT, SharedMemoryRegions
        from gateway.types import Datatype

        x = np.arange(1024, dtype=np.float32)
        path = SHM_ROOT / {key.lstrip("/")!r}
        path.write_bytes(x.tobytes())
        regions = SharedMemoryRegions(enabled=True)
        regions.register("r", {key!r}, 0, x.nbytes)
        place = regions.place("input 'x'", {{REGION: "r", BYTE_SIZE: x.nbytes}})
        tensor = regions.read("x", Datatype.FP32, (1024,), place)
        os.truncate(path, 0)
        print(repr(float(tensor.data.sum())), flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert float(done.stdout.strip()) == float(np.arange(1024, dtype=np.float32).sum())


def test_an_input_keeps_what_was_sent_when_the_client_rewrites_its_region(key: str) -> None:
    x = np.arange(16, dtype=np.int32)
    path = _object(key, x.tobytes())
    regions = _regions(key, x.nbytes)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: x.nbytes})
    assert place is not None
    tensor = regions.read("x", Datatype.INT32, (16,), place)
    path.write_bytes(np.zeros(16, dtype=np.int32).tobytes())
    np.testing.assert_array_equal(tensor.data, x)


def test_an_output_written_to_a_shrunk_object_lands_where_it_was_asked(key: str) -> None:
    path = _object(key, bytes(64))
    regions = _regions(key, 64)
    os.truncate(path, 0)
    y = np.arange(8, dtype=np.float32)
    place = regions.place("output 'y'", {REGION: "r", BYTE_SIZE: 32, shared_memory.OFFSET: 32})
    assert place is not None
    assert regions.write(Tensor("y", Datatype.FP32, (8,), y), place) == 32
    np.testing.assert_array_equal(np.frombuffer(path.read_bytes()[32:64], dtype=np.float32), y)


@pytest.mark.parametrize("gil_held", [True, False], ids=["gil-held", "os-calls"])
@pytest.mark.parametrize("size", [4096, 3 * shared_memory.GIL_HELD_MAX_BYTES + 4])
def test_reads_and_writes_move_every_byte(
    key: str, size: int, gil_held: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of copying (libc's calls that keep the GIL, and os.preadv / os.pwrite, used for
    large copies and where libc has no pread64) move the same bytes, at an offset."""
    if not gil_held:
        monkeypatch.setattr(shared_memory, "_PREAD", None)
        monkeypatch.setattr(shared_memory, "_PWRITE", None)
    elif shared_memory._PREAD is None:
        pytest.skip("this C library has no pread64")
    offset = 100
    data = np.random.default_rng(3).integers(0, 255, size, dtype=np.uint8)
    path = _object(key, bytes(offset) + data.tobytes())
    regions = _regions(key, offset + size)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: size, shared_memory.OFFSET: offset})
    assert place is not None
    np.testing.assert_array_equal(regions.read("x", Datatype.UINT8, (size,), place).data, data)
    reversed_data = data[::-1].copy()
    regions.write(Tensor("y", Datatype.UINT8, (size,), reversed_data), place)
    assert path.read_bytes()[offset:] == reversed_data.tobytes()


def _no_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every read of an object's bytes (none should happen in the tests that use it)."""
    sizes: list[int] = []
    real = shared_memory.read_at

    def read_at(fd: int, size: int, offset: int) -> np.ndarray:
        sizes.append(size)
        return real(fd, size, offset)

    monkeypatch.setattr(shared_memory, "read_at", read_at)
    return sizes


def test_a_numeric_input_whose_byte_size_is_not_its_shapes_is_refused_before_a_read(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sparse object can be registered far larger than the machine's memory: a byte size the
    shape does not need must be refused before the gateway allocates and copies it."""
    path = SHM_ROOT / key.lstrip("/")
    path.touch()
    os.truncate(path, 8 << 30)  # sparse: no memory behind it
    regions = _regions(key, 8 << 30)
    reads = _no_reads(monkeypatch)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: 4 << 30})
    assert place is not None
    with pytest.raises(InvalidInput, match=r"shape \[1, 16\] of INT32 needs 64 bytes"):
        regions.read("x", Datatype.INT32, (1, 16), place)
    assert reads == []


def test_a_bytes_input_over_the_body_limit_is_refused_before_a_read(
    key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _object(key, bytes(4096))
    regions = _regions(key, 4096)
    reads = _no_reads(monkeypatch)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: 4096})
    assert place is not None
    with pytest.raises(PayloadTooLarge, match="MODELYARD_MAX_REQUEST_BODY_MB"):
        regions.read("x", Datatype.BYTES, (1,), place, InputLimits(max_body_bytes=1024))
    assert reads == []


def test_a_requests_inputs_in_shared_memory_are_held_to_one_bodys_limit_in_all(key: str) -> None:
    """Each input fits the limit; the two together do not, as the same tensors in one body would not."""
    x = np.arange(256, dtype=np.float32)  # 1 KiB
    _object(key, x.tobytes() * 2)
    regions = _regions(key, 2 * x.nbytes)
    request = service_pb2.ModelInferRequest(model_name="m")
    for index, name in enumerate(("a", "b")):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[256])
        tensor.parameters[REGION].string_param = "r"
        tensor.parameters[BYTE_SIZE].int64_param = x.nbytes
        tensor.parameters[shared_memory.OFFSET].int64_param = index * x.nbytes
    alone = decode_infer_request(request, InputLimits(max_body_bytes=2 * x.nbytes), regions)
    np.testing.assert_array_equal(alone.inputs[1].data, x)
    with pytest.raises(PayloadTooLarge, match="input 'b'"):
        decode_infer_request(request, InputLimits(max_body_bytes=2 * x.nbytes - 1), regions)


def test_inputs_copied_from_shared_memory_hold_the_in_flight_budget_while_they_live(key: str) -> None:
    """The copies count against the gateway's budget of request bytes in flight, as request bodies
    do; each gives its bytes back once no one holds it."""
    x = np.arange(1024, dtype=np.float32)  # 4 KiB
    _object(key, x.tobytes())
    budget = BodyBudget(2 * x.nbytes)
    regions = SharedMemoryRegions(enabled=True, budget=budget)
    regions.register("r", key, 0, x.nbytes)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: x.nbytes})
    assert place is not None
    held = [regions.read("x", Datatype.FP32, (1024,), place) for _ in range(2)]
    assert budget.in_flight == 2 * x.nbytes
    with pytest.raises(Overloaded, match="MODELYARD_MAX_INFLIGHT_BODY_MB"):
        regions.read("x", Datatype.FP32, (1024,), place)
    assert budget.in_flight == 2 * x.nbytes
    np.testing.assert_array_equal(held[0].data, x)
    del held
    gc.collect()
    assert budget.in_flight == 0
    np.testing.assert_array_equal(regions.read("x", Datatype.FP32, (1024,), place).data, x)


def test_a_refused_read_gives_its_budget_back(key: str) -> None:
    path = _object(key, bytes(64))
    budget = BodyBudget(1 << 20)
    regions = SharedMemoryRegions(enabled=True, budget=budget)
    regions.register("r", key, 0, 64)
    os.truncate(path, 16)
    place = regions.place("input 'x'", {REGION: "r", BYTE_SIZE: 64})
    assert place is not None
    with pytest.raises(SharedMemoryError, match="smaller than the region"):
        regions.read("x", Datatype.INT32, (16,), place)
    assert budget.in_flight == 0
