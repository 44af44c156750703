"""The machine a benchmark runs on, as its reports name it: CPU model, cores, platform, and the
versions of Python, modelyard, each backend's packages and Java (for TorchServe). Shared by
`modelyard bench` and the scripts in benchmarks/."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from adapters import BACKENDS


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo; "unknown" where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def machine_facts() -> dict[str, str]:
    facts = {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    for package in ("modelyard", *(p for adapter in BACKENDS.values() for p in adapter.packages)):
        with contextlib.suppress(metadata.PackageNotFoundError):
            facts[package] = metadata.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=10)
        facts["java (TorchServe)"] = (java.stderr or java.stdout).splitlines()[0]
    with contextlib.suppress(OSError):
        facts["load average (1, 5, 15 min)"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return facts
