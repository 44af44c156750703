"""Build the example TensorFlow-built models in model_repo/: `affine_tf` (SavedModel),
`affine_litert` (LiteRT, model.tflite) and `affine_keras` (Keras 3, model.keras), each the same
function as `affine`; and `mlp_tf` (SavedModel), the same network as `mlp`.

    python -m scripts.build_tf_models [--repo model_repo]

`affine_*`: y = x @ W + b on FP32 [-1, 4] -> [-1, 3], with `affine_weights(version)`. `mlp_tf`: the
ReLU MLP input FP32 [-1, 64] -> logits FP32 [-1, 10] with `mlp_weights(MLP_SIZES, 7)`, the weights of
`mlp` (ONNX) and `mlp_torch` version 1 (TorchScript). So the deployments of one model on each backend
can be compared request for request. The small files are committed; running this again writes
byte-identical SavedModels and .tflite files (a .keras file is a zip that records when it was saved,
so only its weights and config repeat).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf
from tensorflow.core.protobuf import fingerprint_pb2

from scripts.build_models import affine_weights, mlp_weights

MLP_SIZES = (64, 256, 256, 10)
MLP_SEED = 7  # model_repo/mlp's seed

AFFINE_TF_CONFIG = """\
# The TensorFlow twin of `affine`: the same weights per version, served in-process by TensorFlow.
backend: tensorflow
twin_of: affine
version_policy: all
labels: {stable: 1, canary: 2}
limits: {max_inflight: 64, max_queue: 256, timeout_ms: 2000}
tensorflow: {signature: serving_default, intra_op_threads: 1, inter_op_threads: 1}
"""


AFFINE_LITERT_CONFIG = """\
# The LiteRT twin of `affine`: the same weights per version, served in-process by ai-edge-litert.
backend: litert
twin_of: affine
version_policy: all
labels: {stable: 1, canary: 2}
limits: {max_inflight: 64, max_queue: 256, timeout_ms: 2000}
litert: {threads: 1, pool_size: 2}
"""

AFFINE_KERAS_CONFIG = """\
# The Keras 3 twin of `affine`: the same weights per version, served in-process by Keras on TensorFlow.
backend: keras
twin_of: affine
version_policy: all
labels: {stable: 1, canary: 2}
limits: {max_inflight: 64, max_queue: 256, timeout_ms: 2000}
keras: {backend: tensorflow}
"""


class Affine(tf.Module):
    def __init__(self, version: int) -> None:
        super().__init__(name="affine")
        weight, bias = affine_weights(version)
        self.weight = tf.constant(weight)
        self.bias = tf.constant(bias)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(self, x: Any) -> dict[str, Any]:
        return {"y": tf.matmul(x, self.weight) + self.bias}


MLP_TF_CONFIG = """\
# The ONNX `mlp` example's network as a SavedModel, served in-process by TensorFlow.
backend: tensorflow
twin_of: mlp
limits: {max_inflight: 64, max_queue: 256}
tensorflow: {signature: serving_default, intra_op_threads: 1, inter_op_threads: 1}
"""


class MLP(tf.Module):
    def __init__(self, seed: int) -> None:
        super().__init__(name="mlp")
        self.layers = [(tf.constant(w), tf.constant(b)) for w, b in mlp_weights(MLP_SIZES, seed)]

    @tf.function(input_signature=[tf.TensorSpec([None, MLP_SIZES[0]], tf.float32, name="input")])
    def serve(self, x: Any) -> dict[str, Any]:
        for index, (weight, bias) in enumerate(self.layers):
            x = tf.matmul(x, weight) + bias
            if index < len(self.layers) - 1:
                x = tf.nn.relu(x)
        return {"logits": x}


def save(module: tf.Module, signature: Any, path: Path) -> None:
    tf.saved_model.save(module, str(path), signatures={"serving_default": signature})
    # fingerprint.pb carries a random UUID per save; clear it so the files are reproducible.
    fingerprint_path = path / "fingerprint.pb"
    if fingerprint_path.exists():
        fingerprint = fingerprint_pb2.FingerprintDef.FromString(fingerprint_path.read_bytes())
        fingerprint.ClearField("uuid")
        fingerprint_path.write_bytes(fingerprint.SerializeToString(deterministic=True))


def build_affine_tf(version: int, path: Path) -> None:
    module = Affine(version)
    save(module, module.serve, path)


def build_mlp_tf(seed: int, path: Path) -> None:
    module = MLP(seed)
    save(module, module.serve, path)


def build_affine_litert(version: int, path: Path) -> None:
    """The same function converted to LiteRT's flatbuffer, batch dimension left open."""
    module = Affine(version)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.serve.get_concrete_function()], module
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(converter.convert())


def build_affine_keras(version: int, path: Path) -> None:
    """The same function as a functional Keras 3 model: input `x`, a Dense layer, output `y`."""
    import keras

    weight, bias = affine_weights(version)
    x = keras.Input((4,), name="x", dtype="float32")
    dense = keras.layers.Dense(3, name="dense")
    model = keras.Model(x, {"y": dense(x)}, name="affine")
    dense.set_weights([weight, bias])
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(str(path))


BUILDERS = (
    ("affine_tf", "model.savedmodel", build_affine_tf, AFFINE_TF_CONFIG),
    ("affine_litert", "model.tflite", build_affine_litert, AFFINE_LITERT_CONFIG),
    ("affine_keras", "model.keras", build_affine_keras, AFFINE_KERAS_CONFIG),
)


def build_repository(repo: Path) -> list[Path]:
    written = []
    for name, artifact, build, config in BUILDERS:
        for version in (1, 2):
            path = repo / name / str(version) / artifact
            build(version, path)
            written.append(path)
        (repo / name / "config.yaml").write_text(config)
        written.append(repo / name / "config.yaml")
    path = repo / "mlp_tf" / "1" / "model.savedmodel"
    build_mlp_tf(MLP_SEED, path)
    (repo / "mlp_tf" / "config.yaml").write_text(MLP_TF_CONFIG)
    written += [path, repo / "mlp_tf" / "config.yaml"]
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
