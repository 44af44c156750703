"""TensorFlow's native start-up lines, filtered from the gateway's standard error.

TensorFlow 2.19 and later print several lines from C++ before its logging is set up, so
TF_CPP_MIN_LOG_LEVEL cannot hold them back (tensorflow/tensorflow#100442): the absl preamble, the
oneDNN and CPU-feature notes, "Could not find cuda drivers", and on a machine with no GPU a failed
cuInit at the first device probe. While serving starts, file descriptor 2 points at a temporary
file; afterwards every line of it that is not one of those goes to standard error, in order.
Setting TF_CPP_MIN_LOG_LEVEL=0 asks for all of them and turns the filter off.

TensorFlow is imported only where it is needed: when the first TensorFlow-family model loads, or
the first TF Serving gRPC call arrives (`quiet_import`, which both go through), so the filter is
set up then, not at the process's start.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType

# An absl/glog line at INFO level ("I1203 05:56:18.392875   26775 port.cc:153] ..."), the preamble
# absl prints before its first line, the CPU-feature note's second line, and the failed CUDA probe.
_NOISE = re.compile(
    r"^(I\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    r"|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit)"
)


# One filter at a time: it swaps the process's descriptor 2, which two threads must not do at once.
_FILTER_LOCK = threading.RLock()
_probed: list[bool] = []


def is_noise(line: str) -> bool:
    return _NOISE.match(line) is not None


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Runs the block with native writes to standard error held back, then passes on all but the
    start-up noise. Python's own writes in the block pass through the same way, after it."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    with _FILTER_LOCK, tempfile.TemporaryFile() as held:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line for line in held.read().decode(errors="replace").splitlines(True) if not is_noise(line)
            ]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


def quiet_start() -> None:
    """What a serving process sets at its start: TensorFlow's own logging at warning level, for
    whenever TensorFlow is imported. Nothing is imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def quiet_import(module: str) -> ModuleType:
    """`module`; imported inside the filter where this process has not imported it yet, with
    TensorFlow's first device probe made there too where the import brought TensorFlow in."""
    found = sys.modules.get(module)
    if found is not None:
        return found
    with _FILTER_LOCK, filtered_native_stderr():
        imported = importlib.import_module(module)
        probe_tensorflow_devices()
    return imported


def probe_tensorflow_devices() -> None:
    """TensorFlow's first device probe (the cuInit call), made once, inside the filter, rather than
    at the first SavedModel's load, where the filter is not; nothing where TensorFlow was not imported."""
    tf = sys.modules.get("tensorflow")
    if tf is not None and not _probed:
        tf.config.list_physical_devices("GPU")
        _probed.append(True)
