"""modelyard: one front door for model inference."""

from __future__ import annotations

import os
import sys

__version__ = "0.1.0"

# The gRPC core experiments the gateway turns off. The EventEngine listener (on by default since
# grpcio 1.8x) costs the gateway about 30 µs of CPU and two thread switches more per unary
# call than the listener it replaces, with the same answers (benchmarks/README.md, "The gRPC
# stack"). An operator's own GRPC_EXPERIMENTS is left as it is.
GRPC_EXPERIMENTS = "-event_engine_listener"


def _set_grpc_experiments() -> None:
    """grpc reads GRPC_EXPERIMENTS once, as it is imported; so it is imported here, before any
    module of the gateway imports it, with the variable set for that moment only: processes the
    gateway starts (a managed TorchServe, a benchmark's peers) get the environment they were given."""
    if "GRPC_EXPERIMENTS" in os.environ or "grpc" in sys.modules:
        return
    os.environ["GRPC_EXPERIMENTS"] = GRPC_EXPERIMENTS
    try:
        import grpc  # noqa: F401
    finally:
        del os.environ["GRPC_EXPERIMENTS"]


_set_grpc_experiments()
