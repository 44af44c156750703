"""Triton's system shared-memory extension over REST and gRPC, through tritonclient and its
utils.shared_memory, as Triton's simple_http_shm_client and simple_grpc_shm_client examples use
them; outputs checked against onnxruntime run directly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
import tritonclient.utils.shared_memory as shm
from tritonclient import utils
from tritonclient.utils import InferenceServerException

from gateway.types import Datatype
from scripts.build_models import _save, build_affine
from tests.support import Protocol, RunningGateway, start_gateway
from tests.support.model_builders import build_identity, build_simple

SHM_ROOT = Path("/dev/shm")

# How Triton's messages begin, from its src/shared_memory_manager.cc (SharedMemoryManager::GetStatus,
# GetMemoryInfo, RegisterSystemSharedMemory, OpenSharedMemoryRegion, CheckSharedMemoryRegionSize):
# clients and tritonclient's examples match on these words.
UNKNOWN_ON_STATUS = "Unable to find system shared memory region: '{}'"
UNKNOWN_IN_REQUEST = "Unable to find shared memory region: '{}'"
OFFSET_OUTSIDE = "Invalid offset for shared memory region: '{}'"
PLACE_OUTSIDE = "Invalid offset + byte size for shared memory region: '{}'"
ALREADY_REGISTERED = "shared memory region '{}' already in manager"
CANNOT_OPEN = "Unable to open shared memory region: '{}'"
PAST_THE_OBJECT = "failed to register shared memory region '{}': invalid args"


@pytest.fixture(scope="module")
def shm_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("shm_repo")
    _save(build_simple(), repo / "simple" / "1" / "model.onnx")
    _save(build_affine(1), repo / "affine" / "1" / "model.onnx")
    _save(build_identity(Datatype.BYTES), repo / "identity_bytes" / "1" / "model.onnx")
    return repo


@pytest.fixture(scope="module")
def shm_gateway(shm_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    running = start_gateway(
        shm_repo, tmp_path_factory.mktemp("shm") / "gateway.log", env={"MODELYARD_ALLOW_CLIENT_SHM": "true"}
    )
    yield running
    assert running.stop() == 0
    assert "Traceback" not in running.output(), running.output()[-3000:]


def _client(kind: str, gateway: RunningGateway) -> Protocol:
    if kind == "rest":
        return Protocol(
            "rest", triton_http, triton_http.InferenceServerClient(gateway.http, network_timeout=60)
        )
    return Protocol("grpc", triton_grpc, triton_grpc.InferenceServerClient(gateway.grpc))


@pytest.fixture(params=["rest", "grpc"])
def protocol(request: pytest.FixtureRequest, shm_gateway: RunningGateway) -> Iterator[Protocol]:
    client = _client(request.param, shm_gateway)
    yield client
    client.client.unregister_system_shared_memory()
    client.client.close()


class Regions:
    """The test's own shared memory objects, each with a unique key, destroyed at the end."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.handles: list[Any] = []

    def create(self, name: str, byte_size: int) -> tuple[Any, str]:
        key = f"/modelyard_test_{os.getpid()}_{self.tag}_{name}"
        handle = shm.create_shared_memory_region(name, key, byte_size)
        self.handles.append(handle)
        return handle, key

    def destroy(self) -> None:
        for handle in self.handles:
            shm.destroy_shared_memory_region(handle)


@pytest.fixture
def regions(protocol: Protocol) -> Iterator[Regions]:
    made = Regions(protocol.name)
    yield made
    protocol.client.unregister_system_shared_memory()
    made.destroy()


def _expected(repo: Path, model: str, feeds: dict[str, Any]) -> list[Any]:
    return ort.InferenceSession(str(repo / model / "1" / "model.onnx")).run(None, feeds)


def _refused(protocol: Protocol, call: Any) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return protocol.error_code(caught.value), caught.value.message()


def test_the_simple_shm_client_example_works_unchanged(
    protocol: Protocol, regions: Regions, shm_repo: Path
) -> None:
    """The steps of Triton's simple_http_shm_client.py / simple_grpc_shm_client.py, in order."""
    module, client = protocol.module, protocol.client
    client.unregister_system_shared_memory()
    client.unregister_cuda_shared_memory()

    input0_data = np.arange(start=0, stop=16, dtype=np.int32)
    input1_data = np.ones(shape=16, dtype=np.int32)
    input_byte_size = input0_data.size * input0_data.itemsize
    output_byte_size = input_byte_size

    shm_op_handle, output_key = regions.create("output_data", output_byte_size * 2)
    client.register_system_shared_memory("output_data", output_key, output_byte_size * 2)
    shm_ip_handle, input_key = regions.create("input_data", input_byte_size * 2)
    shm.set_shared_memory_region(shm_ip_handle, [input0_data])
    shm.set_shared_memory_region(shm_ip_handle, [input1_data], offset=input_byte_size)
    client.register_system_shared_memory("input_data", input_key, input_byte_size * 2)

    inputs = [module.InferInput("INPUT0", [1, 16], "INT32"), module.InferInput("INPUT1", [1, 16], "INT32")]
    inputs[0].set_shared_memory("input_data", input_byte_size)
    inputs[1].set_shared_memory("input_data", input_byte_size, offset=input_byte_size)
    if protocol.is_grpc:
        outputs = [module.InferRequestedOutput("OUTPUT0"), module.InferRequestedOutput("OUTPUT1")]
    else:
        outputs = [
            module.InferRequestedOutput("OUTPUT0", binary_data=True),
            module.InferRequestedOutput("OUTPUT1", binary_data=True),
        ]
    outputs[0].set_shared_memory("output_data", output_byte_size)
    outputs[1].set_shared_memory("output_data", output_byte_size, offset=output_byte_size)

    results = client.infer(model_name="simple", inputs=inputs, outputs=outputs)

    read = []
    for index, name in enumerate(("OUTPUT0", "OUTPUT1")):
        output = results.get_output(name)
        assert output is not None
        datatype = output.datatype if protocol.is_grpc else output["datatype"]
        shape = list(output.shape) if protocol.is_grpc else output["shape"]
        read.append(
            shm.get_contents_as_numpy(
                shm_op_handle, utils.triton_to_np_dtype(datatype), shape, offset=index * output_byte_size
            )
        )
    expected = _expected(shm_repo, "simple", {"INPUT0": input0_data[None], "INPUT1": input1_data[None]})
    for got, want in zip(read, expected, strict=True):
        np.testing.assert_array_equal(got, want)

    status = client.get_system_shared_memory_status()
    if protocol.is_grpc:
        listed = {name: (r.key, r.offset, r.byte_size) for name, r in status.regions.items()}
    else:
        listed = {r["name"]: (r["key"], r["offset"], r["byte_size"]) for r in status}
    assert listed == {
        "input_data": (input_key, 0, input_byte_size * 2),
        "output_data": (output_key, 0, output_byte_size * 2),
    }
    client.unregister_system_shared_memory()
    empty = client.get_system_shared_memory_status()
    assert (len(empty.regions) if protocol.is_grpc else len(empty)) == 0


def test_shared_memory_and_sent_tensors_mix(protocol: Protocol, regions: Regions, shm_repo: Path) -> None:
    """One input and one output in shared memory, the others on the wire: each lands where asked."""
    module, client = protocol.module, protocol.client
    a = np.arange(32, dtype=np.int32).reshape(2, 16)
    b = np.full((2, 16), 7, dtype=np.int32)
    handle, key = regions.create("mixed", a.nbytes * 2)
    shm.set_shared_memory_region(handle, [a], offset=a.nbytes)
    client.register_system_shared_memory("mixed", key, a.nbytes * 2)
    inputs = [module.InferInput("INPUT0", [2, 16], "INT32"), protocol.input("INPUT1", b, "INT32")]
    inputs[0].set_shared_memory("mixed", a.nbytes, offset=a.nbytes)
    outputs = [protocol.output("OUTPUT0"), protocol.output("OUTPUT1")]
    outputs[1].set_shared_memory("mixed", a.nbytes)
    result = client.infer("simple", inputs, outputs=outputs)
    total, difference = _expected(shm_repo, "simple", {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), total)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.int32, [2, 16]), difference)


def test_bytes_tensors_travel_through_shared_memory(protocol: Protocol, regions: Regions) -> None:
    module, client = protocol.module, protocol.client
    words = np.array([[b"modelyard", b""], ["caf\u00e9".encode(), b"x" * 100]], dtype=np.object_)
    serialized = utils.serialize_byte_tensor(words)
    size = utils.serialized_byte_size(serialized)
    handle, key = regions.create("words", size * 2)
    shm.set_shared_memory_region(handle, [serialized])
    client.register_system_shared_memory("words", key, size * 2)
    tensor = module.InferInput("INPUT", [2, 2], "BYTES")
    tensor.set_shared_memory("words", size)
    output = protocol.output("OUTPUT")
    output.set_shared_memory("words", size, offset=size)
    client.infer("identity_bytes", [tensor], outputs=[output])
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.object_, [2, 2], offset=size), words)


@pytest.mark.parametrize(
    ("offset", "byte_size"),
    [(0, 80), (16, 64), (0, 32)],
    ids=["larger-than-region", "past-the-end", "wrong-size-for-shape"],
)
def test_an_input_place_outside_its_region_is_refused(
    protocol: Protocol, regions: Regions, offset: int, byte_size: int
) -> None:
    module, client = protocol.module, protocol.client
    _, key = regions.create("small", 64)
    client.register_system_shared_memory("small", key, 64)
    inputs = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for tensor in inputs:
        tensor.set_shared_memory("small", byte_size, offset=offset)
    code, message = _refused(protocol, lambda: client.infer("simple", inputs))
    assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400")
    if byte_size == 32:  # inside the region, but not the size the input's shape needs
        assert "INPUT0" in message
    else:
        assert message.startswith(PLACE_OUTSIDE.format("small")), message
        assert "INPUT0" in message, message


@pytest.mark.parametrize("tensor", ["input", "output"])
def test_a_place_that_starts_past_its_region_says_so_as_triton(
    protocol: Protocol, regions: Regions, tensor: str
) -> None:
    module, client = protocol.module, protocol.client
    _, key = regions.create("short", 64)
    client.register_system_shared_memory("short", key, 64)
    x = np.ones((1, 16), dtype=np.int32)
    inputs = [protocol.input("INPUT0", x, "INT32"), protocol.input("INPUT1", x, "INT32")]
    outputs = None
    if tensor == "input":
        inputs[0] = module.InferInput("INPUT0", [1, 16], "INT32")
        inputs[0].set_shared_memory("short", 64, offset=64)
    else:
        outputs = [protocol.output("OUTPUT0")]
        outputs[0].set_shared_memory("short", 64, offset=96)
    code, message = _refused(protocol, lambda: client.infer("simple", inputs, outputs=outputs))
    assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400")
    assert message.startswith(OFFSET_OUTSIDE.format("short")), message
    assert ("INPUT0" if tensor == "input" else "OUTPUT0") in message, message


def test_an_output_larger_than_its_place_is_refused(protocol: Protocol, regions: Regions) -> None:
    client = protocol.client
    _, key = regions.create("out", 128)
    client.register_system_shared_memory("out", key, 128)
    x = np.zeros((4, 16), dtype=np.int32)
    inputs = [protocol.input("INPUT0", x, "INT32"), protocol.input("INPUT1", x, "INT32")]
    output = protocol.output("OUTPUT0")
    output.set_shared_memory("out", 100)
    code, message = _refused(protocol, lambda: client.infer("simple", inputs, outputs=[output]))
    assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400")
    assert "256 bytes" in message and "100" in message


def test_an_unregistered_region_is_refused(protocol: Protocol, regions: Regions) -> None:
    module, client = protocol.module, protocol.client
    handle, key = regions.create("gone", 128)
    shm.set_shared_memory_region(handle, [np.ones(32, dtype=np.int32)])
    client.register_system_shared_memory("gone", key, 128)
    client.unregister_system_shared_memory("gone")
    inputs = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for index, tensor in enumerate(inputs):
        tensor.set_shared_memory("gone", 64, offset=64 * index)
    code, message = _refused(protocol, lambda: client.infer("simple", inputs))
    assert code == ("NOT_FOUND" if protocol.is_grpc else "404")
    assert message.startswith(UNKNOWN_IN_REQUEST.format("gone")), message
    assert "INPUT0" in message, message
    x = np.ones((1, 16), dtype=np.int32)
    output = protocol.output("OUTPUT1")
    output.set_shared_memory("gone", 64)
    code, message = _refused(
        protocol,
        lambda: client.infer(
            "simple",
            [protocol.input("INPUT0", x, "INT32"), protocol.input("INPUT1", x, "INT32")],
            outputs=[output],
        ),
    )
    assert code == ("NOT_FOUND" if protocol.is_grpc else "404")
    assert message.startswith(UNKNOWN_IN_REQUEST.format("gone")), message
    assert "OUTPUT1" in message, message
    status_code, message = _refused(protocol, lambda: client.get_system_shared_memory_status("gone"))
    assert status_code == ("NOT_FOUND" if protocol.is_grpc else "404")
    assert message.startswith(UNKNOWN_ON_STATUS.format("gone")), message


def test_an_object_shrunk_after_registration_is_refused_not_read(
    protocol: Protocol, regions: Regions
) -> None:
    """Reading a mapping past its object's end would crash the gateway (SIGBUS): it checks first."""
    module, client = protocol.module, protocol.client
    _, key = regions.create("shrinks", 128)
    client.register_system_shared_memory("shrinks", key, 128)
    os.truncate(SHM_ROOT / key.lstrip("/"), 16)
    inputs = [module.InferInput(name, [1, 16], "INT32") for name in ("INPUT0", "INPUT1")]
    for index, tensor in enumerate(inputs):
        tensor.set_shared_memory("shrinks", 64, offset=64 * index)
    code, message = _refused(protocol, lambda: client.infer("simple", inputs))
    assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400")
    assert "smaller than the region" in message
    assert client.is_server_live()


def test_only_shared_memory_objects_can_be_registered(
    protocol: Protocol, regions: Regions, tmp_path: Path
) -> None:
    client = protocol.client
    _, key = regions.create("real", 64)
    target = tmp_path / "secret"
    target.write_bytes(b"s" * 4096)
    link = SHM_ROOT / f"modelyard_test_{os.getpid()}_{protocol.name}_link"
    link.symlink_to(target)
    try:
        for bad_key in ("/../etc/passwd", "/a/b", "/", f"/{link.name}", "/modelyard_no_such_object"):
            code, message = _refused(
                protocol, lambda k=bad_key: client.register_system_shared_memory("bad", k, 16)
            )  # type: ignore[misc]
            assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400"), (bad_key, message)
            assert message.startswith(CANNOT_OPEN.format(bad_key)), message
        code, message = _refused(protocol, lambda: client.register_system_shared_memory("big", key, 65))
        assert code == ("INVALID_ARGUMENT" if protocol.is_grpc else "400")
        assert message.startswith(PAST_THE_OBJECT.format("big")), message
        assert "pass the end" in message
        client.register_system_shared_memory("real", key, 64)
        code, message = _refused(protocol, lambda: client.register_system_shared_memory("real", key, 64))
        assert code == ("ALREADY_EXISTS" if protocol.is_grpc else "409")
        assert message.startswith(ALREADY_REGISTERED.format("real")), message
    finally:
        link.unlink()
    listed = client.get_system_shared_memory_status()
    assert (list(listed.regions) if protocol.is_grpc else [r["name"] for r in listed]) == ["real"]


def test_cuda_shared_memory_is_refused_clearly(protocol: Protocol) -> None:
    client = protocol.client
    code, message = _refused(protocol, lambda: client.register_cuda_shared_memory("gpu", b"aGFuZGxl", 0, 64))
    assert code == ("UNIMPLEMENTED" if protocol.is_grpc else "501")
    assert "GPU" in message and "system shared memory" in message
    status = client.get_cuda_shared_memory_status()
    assert (len(status.regions) if protocol.is_grpc else len(status)) == 0
    code, message = _refused(protocol, lambda: client.get_cuda_shared_memory_status("gpu"))
    assert code == ("NOT_FOUND" if protocol.is_grpc else "404")
    assert message.startswith("Unable to find cuda shared memory region: 'gpu'"), message
    client.unregister_cuda_shared_memory()


@pytest.mark.parametrize("kind", ["rest", "grpc"])
def test_registration_is_off_unless_allowed(gateway: RunningGateway, kind: str) -> None:
    """The session gateway runs with the default: it takes no region, and says how to allow it."""
    protocol = _client(kind, gateway)
    key = f"/modelyard_test_{os.getpid()}_off_{kind}"
    handle = shm.create_shared_memory_region("off", key, 64)
    try:
        protocol.client.unregister_system_shared_memory()
        code, message = _refused(
            protocol, lambda: protocol.client.register_system_shared_memory("off", key, 64)
        )
        assert code == ("UNIMPLEMENTED" if protocol.is_grpc else "501")
        assert "MODELYARD_ALLOW_CLIENT_SHM" in message
        status = protocol.client.get_system_shared_memory_status()
        assert (len(status.regions) if protocol.is_grpc else len(status)) == 0
    finally:
        shm.destroy_shared_memory_region(handle)
        protocol.client.close()


def test_server_metadata_lists_the_extension(shm_gateway: RunningGateway) -> None:
    extensions = httpx.get(f"{shm_gateway.url}/v2").json()["extensions"]
    assert "system_shared_memory" in extensions
    assert "cuda_shared_memory" not in extensions
