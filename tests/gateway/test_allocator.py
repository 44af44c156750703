"""glibc's malloc as the gateway sets it (gateway/allocator.py): a MiB buffer allocated and freed
per request is reused from the heap, not mapped and faulted in afresh each time. Each case runs in
a fresh interpreter, since malloc's settings last for the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Three 1 MiB buffers held and freed together, as a request's received message, a copy of it and
# an output are: a warm-up round, then the page faults of 100 more rounds.
PROGRAM = """
import resource, sys
from gateway.allocator import tune_malloc
tuned = tune_malloc(int(sys.argv[1]))
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    held = [bytearray(1 << 20) for _ in range(3)]
    del held
round_()
before = faults()
for _ in range(100):
    round_()
print(tuned, faults() - before)
"""


def faults_of(threshold_mb: int, **env: str) -> tuple[bool, int]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(threshold_mb)],
        cwd=ROOT,
        env={**environment, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    return out[0] == "True", int(out[1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")


def test_with_the_gateways_threshold_per_request_buffers_fault_no_pages_in() -> None:
    tuned, faults = faults_of(8)
    assert tuned
    # 100 rounds of 3 MiB would be 76800 pages faulted in afresh; a few stray ones are allowed.
    assert faults < 1000


def test_glibcs_own_threshold_faults_them_in_every_time() -> None:
    # What the setting changes, on this machine: 0 leaves glibc's dynamic thresholds.
    tuned, faults = faults_of(0)
    assert not tuned
    assert faults > 10_000


@pytest.mark.parametrize("name", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"])
def test_an_operators_own_malloc_settings_decide(name: str) -> None:
    value = "glibc.malloc.trim_threshold=1" if name == "GLIBC_TUNABLES" else "1"
    tuned, faults = faults_of(8, **{name: value})
    assert not tuned
    if name != "MALLOC_MMAP_THRESHOLD_":  # a trim threshold of one byte gives every page back
        assert faults > 10_000
