"""TensorFlow's native start-up lines, filtered from the gateway's standard error.

TensorFlow 2.19 and later print several lines from C++ before its logging is set up, so
TF_CPP_MIN_LOG_LEVEL cannot hold them back (tensorflow/tensorflow#100442): the absl preamble, the
oneDNN and CPU-feature notes, "Could not find cuda drivers", and on a machine with no GPU a failed
cuInit at the first device probe. While serving starts, file descriptor 2 points at a temporary
file; afterwards every line of it that is not one of those goes to standard error, in order.
Setting TF_CPP_MIN_LOG_LEVEL=0 asks for all of them and turns the filter off.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# An absl/glog line at INFO level ("I1203 05:56:18.392875   26775 port.cc:153] ..."), the preamble
# absl prints before its first line, the CPU-feature note's second line, and the failed CUDA probe.
_NOISE = re.compile(
    r"^(I\d{4} [\d:.]+ +\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|To enable the following instructions: .* in other operations, rebuild TensorFlow"
    r"|E\d{4} [\d:.]+ +\d+ cuda_platform\.cc:\d+\] failed call to cuInit)"
)


def is_noise(line: str) -> bool:
    return _NOISE.match(line) is not None


@contextlib.contextmanager
def filtered_native_stderr() -> Iterator[None]:
    """Runs the block with native writes to standard error held back, then passes on all but the
    start-up noise. Python's own writes in the block pass through the same way, after it."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
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


def import_serving_quietly() -> None:
    """What a serving process imports at its start, inside the filter: TensorFlow where it is
    installed (the gateway imports it anyway, for TF Serving's front door) and its first device
    probe; nothing where TensorFlow is not installed."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's own logging at warning level
    with filtered_native_stderr():
        with contextlib.suppress(ImportError):
            import gateway.protocols.tfserving_grpc  # noqa: F401
        probe_tensorflow_devices()


def probe_tensorflow_devices() -> None:
    """TensorFlow's first device probe (the cuInit call), made now, inside the filter, rather than
    at the first SavedModel's load, where the filter is not; nothing where TensorFlow was not imported."""
    tf = sys.modules.get("tensorflow")
    if tf is not None:
        tf.config.list_physical_devices("GPU")
