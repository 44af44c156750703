"""Build the example ONNX models in model_repo/ from fixed seeds.

    python scripts/build_models.py [--repo model_repo]

The .onnx files are committed so `make serve` needs neither onnx nor torch; running this again
writes byte-identical files.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # readable by onnxruntime 1.14 and later

AFFINE_CONFIG = """\
# y = x @ W + b, with other weights in each version: v1 is stable, v2 the canary.
backend: onnxruntime
version_policy: all
labels: {stable: 1, canary: 2}
inputs:  [{name: x, datatype: FP32, shape: [-1, 4]}]
outputs: [{name: y, datatype: FP32, shape: [-1, 3]}]
limits: {max_inflight: 64, max_queue: 256, timeout_ms: 2000}
onnxruntime: {intra_op_threads: 1}
"""


def _save(model: onnx.ModelProto, path: Path) -> None:
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString(deterministic=True))


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    return helper.make_model(graph, producer_name="modelyard", opset_imports=[helper.make_opsetid("", OPSET)])


def affine_weights(version: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + version)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.standard_normal(3).astype(np.float32)


def build_affine(version: int) -> onnx.ModelProto:
    """y = x @ W + b on FP32 [-1, 4] -> [-1, 3]."""
    weight, bias = affine_weights(version)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")],
    )
    return _model(graph)


def mlp_weights(sizes: tuple[int, ...], seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    layers = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        scale = np.sqrt(2.0 / fan_in)
        weight = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
        layers.append((weight, np.zeros(fan_out, dtype=np.float32)))
    return layers


def build_mlp(
    sizes: tuple[int, ...] = (64, 256, 256, 10), seed: int = 7, name: str = "mlp"
) -> onnx.ModelProto:
    """A ReLU MLP, input `input` FP32 [-1, sizes[0]] -> output `logits` FP32 [-1, sizes[-1]]."""
    nodes, initializers = [], []
    current = "input"
    layers = mlp_weights(sizes, seed)
    for index, (weight, bias) in enumerate(layers):
        w_name, b_name = f"W{index}", f"b{index}"
        initializers += [numpy_helper.from_array(weight, w_name), numpy_helper.from_array(bias, b_name)]
        last = index == len(layers) - 1
        gemm_out = "logits" if last else f"h{index}"
        nodes.append(helper.make_node("Gemm", [current, w_name, b_name], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"a{index}"]))
            current = f"a{index}"
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", sizes[-1]])],
        initializer=initializers,
    )
    return _model(graph)


def matmul_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def build_matmul(rows: int, cols: int, seed: int) -> onnx.ModelProto:
    """y = x @ W on FP32 [-1, rows] -> [-1, cols]: a model whose size is its weights,
    rows x cols x 4 bytes (the memory-budget tests and benchmark make them of any size)."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])],
        initializer=[numpy_helper.from_array(matmul_weights(rows, cols, seed), "W")],
    )
    return _model(graph)


def build_text_normalizer() -> onnx.ModelProto:
    """BYTES in, BYTES out: lower-cases each string and drops English stop words."""
    node = helper.make_node(
        "StringNormalizer",
        ["text"],
        ["normalized"],
        case_change_action="LOWER",
        is_case_sensitive=0,
        stopwords=["a", "an", "the", "of"],
        locale="C",  # always present, unlike en_US.UTF-8
    )
    graph = helper.make_graph(
        [node],
        "text_normalizer",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("normalized", TensorProto.STRING, ["m"])],
    )
    return _model(graph)


def build_repository(repo: Path) -> list[Path]:
    written = []
    for version in (1, 2):
        path = repo / "affine" / str(version) / "model.onnx"
        _save(build_affine(version), path)
        written.append(path)
    (repo / "affine" / "config.yaml").write_text(AFFINE_CONFIG)
    written.append(repo / "affine" / "config.yaml")
    for path, model in (
        (repo / "mlp" / "1" / "model.onnx", build_mlp()),
        (repo / "text_normalizer" / "1" / "model.onnx", build_text_normalizer()),
    ):
        _save(model, path)
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent / "model_repo")
    args = parser.parse_args()
    for path in build_repository(args.repo):
        print(path)


if __name__ == "__main__":
    main()
