"""Small ONNX models that exist only to test the gateway: every datatype, slow work, a failing op."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import onnx
from onnx import TensorProto, helper

from gateway.types import Datatype
from scripts.build_models import _model, _save, build_affine, build_mlp, build_repository

ONNX_TYPE = {
    Datatype.BOOL: TensorProto.BOOL,
    Datatype.UINT8: TensorProto.UINT8,
    Datatype.UINT16: TensorProto.UINT16,
    Datatype.UINT32: TensorProto.UINT32,
    Datatype.UINT64: TensorProto.UINT64,
    Datatype.INT8: TensorProto.INT8,
    Datatype.INT16: TensorProto.INT16,
    Datatype.INT32: TensorProto.INT32,
    Datatype.INT64: TensorProto.INT64,
    Datatype.FP16: TensorProto.FLOAT16,
    Datatype.FP32: TensorProto.FLOAT,
    Datatype.FP64: TensorProto.DOUBLE,
    Datatype.BYTES: TensorProto.STRING,
}


def build_identity(datatype: Datatype) -> onnx.ModelProto:
    """INPUT [-1, -1] -> OUTPUT, the same values, of one datatype."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT"], ["OUTPUT"])],
        f"identity_{datatype.value.lower()}",
        [helper.make_tensor_value_info("INPUT", ONNX_TYPE[datatype], ["a", "b"])],
        [helper.make_tensor_value_info("OUTPUT", ONNX_TYPE[datatype], ["a", "b"])],
    )
    return _model(graph)


def build_simple() -> onnx.ModelProto:
    """Triton's example model `simple`: INPUT0, INPUT1 INT32 [-1, 16] -> OUTPUT0 (their sum) and
    OUTPUT1 (their difference), the model tritonclient's example scripts call."""
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 16]) for name in ("INPUT0", "INPUT1")
    ]
    outputs = [
        helper.make_tensor_value_info(name, TensorProto.INT32, ["batch", 16])
        for name in ("OUTPUT0", "OUTPUT1")
    ]
    nodes = [
        helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
        helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
    ]
    return _model(helper.make_graph(nodes, "simple", inputs, outputs))


def build_row_sum(width: int = 64) -> onnx.ModelProto:
    """input FP32 [-1, width] -> sum FP32 [-1]: each row's sum. Its work and its answer are small
    beside its input, so what a large request costs in memory is the gateway's own."""
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["sum"], keepdims=0)],
        "row_sum",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch"])],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )
    return _model(graph)


def build_spin() -> onnx.ModelProto:
    """n INT64 [1] -> sum FP32 [1]: an n x n matrix product, so the client decides how long it runs."""
    nodes = [
        helper.make_node("Concat", ["n", "n"], ["dims"], axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["dims"],
            ["ones"],
            value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("MatMul", ["ones", "ones"], ["square"]),
        helper.make_node("ReduceSum", ["square"], ["total"], keepdims=0),
        helper.make_node("Reshape", ["total", "one_dim"], ["sum"]),
    ]
    graph = helper.make_graph(
        nodes,
        "spin",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1])],
        initializer=[helper.make_tensor("one_dim", TensorProto.INT64, [1], [1])],
    )
    return _model(graph)


def build_reshape() -> onnx.ModelProto:
    """x FP32 [-1] reshaped to `shape`: a shape that does not fit makes ONNX Runtime fail at run time."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])],
        "reshape",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("shape", TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b"])],
    )
    return _model(graph)


def build_gather() -> onnx.ModelProto:
    """x FP32 [-1, 4], idx INT64 [-1, 1] -> y: x[row, idx]. An index past 3 fails at run time, and
    fails every row of a batch it is merged into."""
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "idx"], ["y"], axis=1)],
        "gather",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["n", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
    )
    return _model(graph)


def build_slow_affine(size: int = 2500) -> onnx.ModelProto:
    """affine version 1's function, plus a size x size matrix product that adds exactly zero: the
    same answers, slowly (served with graph optimization off, so the product is not folded away)."""
    from scripts.build_models import affine_weights

    weight, bias = affine_weights(1)
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["fast"]),
        helper.make_node(
            "ConstantOfShape",
            ["dims"],
            ["ones"],
            value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
        ),
        helper.make_node("MatMul", ["ones", "ones"], ["square"]),
        helper.make_node("ReduceSum", ["square"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["fast", "nothing"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow_affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[
            helper.make_tensor("W", TensorProto.FLOAT, [4, 3], weight.ravel().tolist()),
            helper.make_tensor("b", TensorProto.FLOAT, [3], bias.tolist()),
            helper.make_tensor("dims", TensorProto.INT64, [2], [size, size]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    return _model(graph)


SHADOWED = """\
backend: onnxruntime
version_policy: all
labels: {stable: 1}
shadow:
  - {version: 2, percent: 100}
  - {model: affine_twin, percent: 100}
"""
SLOW_SHADOWED = "backend: onnxruntime\nshadow: [{model: affine_slow, percent: 100}]\n"
AFFINE_SLOW = "backend: onnxruntime\nonnxruntime: {graph_optimization: disable}\n"
PRIMARY_BROKEN = "backend: onnxruntime\nfallback: [affine_twin]\n"
ROUTED = """\
backend: onnxruntime
version_policy: all
labels: {stable: 1, canary: 2}
traffic: {1: 50, 2: 50}
routing:
  sticky_header: X-User-Id
  canary:
    - {header: x-canary, equals: "yes", version: 2}
    - {header: x-beta-tester, label: stable}
"""
MLP_BATCHED = "backend: onnxruntime\nbatching: {max_batch_size: 16, max_queue_delay_us: 2000}\n"

EXAMPLE_REPO = Path(__file__).resolve().parents[2] / "model_repo"
SPIN_LIMITED = "backend: onnxruntime\nlimits: {max_inflight: 1, max_queue: 0}\n"
SPIN_DEADLINE = "backend: onnxruntime\nlimits: {timeout_ms: 50}\n"
SPIN_QUEUED = "backend: onnxruntime\nlimits: {max_inflight: 1, max_queue: 4}\n"
SPLIT_DTYPES = "backend: onnxruntime\nversion_policy: all\ntraffic: {1: 50, 2: 50}\n"


def build_test_repository(repo: Path) -> None:
    """The example models plus the test-only ones, and two that must fail to load."""
    build_repository(repo)
    for datatype in Datatype:
        _save(build_identity(datatype), repo / f"identity_{datatype.value.lower()}" / "1" / "model.onnx")
    for name, config in (("spin_limited", SPIN_LIMITED), ("spin_deadline", SPIN_DEADLINE)):
        _save(build_spin(), repo / name / "1" / "model.onnx")
        (repo / name / "config.yaml").write_text(config)
    _save(build_reshape(), repo / "reshape" / "1" / "model.onnx")
    for version in (1, 2):
        _save(build_affine(version), repo / "routed" / str(version) / "model.onnx")
    (repo / "routed" / "config.yaml").write_text(ROUTED)
    _save(build_mlp(), repo / "mlp_batched" / "1" / "model.onnx")
    # Shadow traffic and fallback (tests/gateway/test_rollouts.py).
    _save(build_affine(1), repo / "affine_twin" / "1" / "model.onnx")
    _save(build_slow_affine(), repo / "affine_slow" / "1" / "model.onnx")
    (repo / "affine_slow" / "config.yaml").write_text(AFFINE_SLOW)
    for version in (1, 2):
        _save(build_affine(version), repo / "shadowed" / str(version) / "model.onnx")
    (repo / "shadowed" / "config.yaml").write_text(SHADOWED)
    _save(build_affine(1), repo / "slow_shadowed" / "1" / "model.onnx")
    (repo / "slow_shadowed" / "config.yaml").write_text(SLOW_SHADOWED)
    (repo / "primary_broken" / "1").mkdir(parents=True)
    (repo / "primary_broken" / "1" / "model.onnx").write_bytes(b"not onnx")
    (repo / "primary_broken" / "config.yaml").write_text(PRIMARY_BROKEN)
    (repo / "mlp_batched" / "config.yaml").write_text(MLP_BATCHED)
    # Loaded, unloaded and reloaded by the repository tests, so no other test depends on it.
    _save(build_affine(1), repo / "reloadable" / "1" / "model.onnx")
    (repo / "broken_artifact" / "1").mkdir(parents=True)
    (repo / "broken_artifact" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    _save(build_identity(Datatype.FP32), repo / "broken_config" / "1" / "model.onnx")
    (repo / "broken_config" / "config.yaml").write_text("backend: onnxruntime\nlabelz: {stable: 1}\n")
    # The TensorFlow example as committed, and a copy that the readiness tests unload and reload.
    shutil.copytree(EXAMPLE_REPO / "affine_tf", repo / "affine_tf")
    shutil.copytree(EXAMPLE_REPO / "affine_tf" / "1", repo / "toggle_tf" / "1")
    (repo / "toggle_tf" / "config.yaml").write_text("backend: tensorflow\n")
    # The LiteRT and Keras examples as committed, and an int8-quantized LiteRT model.
    for name in ("affine_litert", "affine_keras"):
        shutil.copytree(EXAMPLE_REPO / name, repo / name)
    build_quantized_litert(repo / "quantized_litert" / "1" / "model.tflite")
    # No limits: the remote of the v2 backend's deadline test.
    _save(build_spin(), repo / "spin" / "1" / "model.onnx")
    # One request at a time with a queue behind it: priorities through every front door.
    _save(build_spin(), repo / "spin_queued" / "1" / "model.onnx")
    (repo / "spin_queued" / "config.yaml").write_text(SPIN_QUEUED)
    # A 50/50 split between versions of different input datatypes: a request decoded against one
    # version's signature and run on the other fails, so each must be routed once.
    _save(build_identity(Datatype.FP32), repo / "split_dtypes" / "1" / "model.onnx")
    _save(build_identity(Datatype.INT64), repo / "split_dtypes" / "2" / "model.onnx")
    (repo / "split_dtypes" / "config.yaml").write_text(SPLIT_DTYPES)


QUANTIZED_SEED = 20261125


def build_quantized_litert(path: Path) -> None:
    """`affine` version 1 with full int8 quantization: INT8 [-1, 4] in, INT8 [-1, 3] out, with the
    scale and zero point the converter picks from a representative dataset."""
    import numpy as np
    import tensorflow as tf

    from scripts.build_tf_models import Affine

    module = Affine(1)
    rng = np.random.default_rng(QUANTIZED_SEED)

    def representative() -> Any:
        for _ in range(64):
            yield [rng.uniform(-3, 3, (1, 4)).astype(np.float32)]

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())


def tfserving_config(model_name: str, grpc_address: str | None, rest_url: str | None, **extra: Any) -> str:
    section: dict[str, Any] = {"model_name": model_name, **extra}
    if grpc_address:
        section["grpc"] = grpc_address
    if rest_url:
        section["rest"] = rest_url
    fields = ", ".join(f"{key}: {value!r}" for key, value in section.items())
    return f"backend: tfserving\nversion_policy: all\ntfserving: {{{fields}}}\n"


def build_tfserving_repository(repo: Path, grpc_address: str, rest_url: str) -> None:
    """`backend: tfserving` models with empty version folders, each remote over gRPC and over REST."""
    remotes: dict[str, tuple[str, tuple[int, ...], dict[str, Any], str]] = {
        "affine": ("affine_tf", (1, 2), {}, "labels: {stable: 1, canary: 2}\n"),
        # Local version 1 stands for whatever the remote labels canary.
        "pinned": ("affine_tf", (1,), {"versions": {1: "canary"}}, ""),
        "text": ("text_normalizer", (1,), {}, ""),
        "toggle": ("toggle_tf", (1,), {}, ""),
        "missing": ("no_such_model", (1,), {}, ""),
        # No version folders: the versions come from tfserving.versions.
        "listed": ("affine_tf", (), {"versions": {1: 1, 2: "canary"}}, ""),
    }
    for local, (remote, versions, options, extra) in remotes.items():
        for transport, address in (("grpc", (grpc_address, None)), ("rest", (None, rest_url))):
            folder = repo / f"remote_{local}_{transport}"
            folder.mkdir(parents=True)
            for version in versions:
                (folder / str(version)).mkdir()
            (folder / "config.yaml").write_text(tfserving_config(remote, *address, **options) + extra)


def v2_config(remote: str, address: str, protocol: str, **extra: Any) -> str:
    section: dict[str, Any] = {"address": address, "protocol": protocol, "model_name": remote, **extra}
    fields = ", ".join(f"{key}: {value!r}" for key, value in section.items())
    return f"backend: v2\nversion_policy: all\nv2: {{{fields}}}\n"


def build_v2_repository(repo: Path, grpc_address: str, rest_url: str) -> None:
    """`backend: v2` models fronting another modelyard, each over gRPC and over REST."""
    remotes: dict[str, tuple[str, tuple[int, ...], dict[str, Any], str]] = {
        # Local versions 1 and 2 stand for the remote's versions 1 and 2, with rollout labels here.
        "affine": ("affine", (), {"versions": {1: "1", 2: "2"}}, "labels: {stable: 1, canary: 2}\n"),
        "litert": ("affine_litert", (1,), {"version": "2"}, ""),
        "text": ("text_normalizer", (1,), {}, ""),
        "spin": ("spin", (1,), {}, ""),
        "missing": ("no_such_model", (1,), {}, ""),
    }
    for local, (remote, versions, options, extra) in remotes.items():
        for protocol, address in (("grpc", grpc_address), ("rest", rest_url)):
            folder = repo / f"v2_{local}_{protocol}"
            folder.mkdir(parents=True)
            for version in versions:
                (folder / str(version)).mkdir()
            (folder / "config.yaml").write_text(v2_config(remote, address, protocol, **options) + extra)
