"""The TensorFlow-side conversions, run as a process of their own by `convert.py` (like tf2onnx):
TensorFlow's graph state and Keras' fixed backend stay out of the process that asked.

    python tf_export.py KIND SOURCE TARGET SIGNATURE [CUSTOM_OBJECTS_MODULE]

KIND: savedmodel-litert (TFLiteConverter.from_saved_model), keras-savedmodel (Keras' own export)
or keras-litert (both, through a SavedModel in a temporary folder). Run as a file, not a module,
so it needs nothing of modelyard on the path.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

KINDS = ("savedmodel-litert", "keras-savedmodel", "keras-litert")


def to_litert(saved_model: Path, target: Path, signature: str) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[signature])
    target.write_bytes(converter.convert())


def load_keras(source: Path, custom_objects_module: str | None) -> Any:
    import keras

    if custom_objects_module:
        importlib.import_module(custom_objects_module)
    return keras.saving.load_model(str(source))


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5) or argv[0] not in KINDS:
        print(__doc__, file=sys.stderr)
        return 2
    kind, source, target, signature = argv[0], Path(argv[1]), Path(argv[2]), argv[3]
    custom = argv[4] if len(argv) == 5 else None
    if kind == "savedmodel-litert":
        to_litert(source, target, signature)
        return 0
    model = load_keras(source, custom)
    if kind == "keras-savedmodel":
        model.export(str(target), format="tf_saved_model", verbose=False)
        return 0
    with tempfile.TemporaryDirectory() as folder:
        saved = Path(folder) / "model.savedmodel"
        model.export(str(saved), format="tf_saved_model", verbose=False)
        # Keras' export names its signature serving_default.
        to_litert(saved, target, "serving_default")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # A .keras file loads on any backend for its weights; the SavedModel export needs TensorFlow's.
    os.environ["KERAS_BACKEND"] = "tensorflow"
    sys.exit(main(sys.argv[1:]))
