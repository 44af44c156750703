"""A quiet start: TensorFlow's native start-up lines are filtered, everything else on standard
error passes, and the session gateway (which serves TensorFlow, Keras and LiteRT models) printed none
of that noise, no deprecation notice and no TensorFlow INFO lines as it started."""

from __future__ import annotations

import os

import pytest

from gateway.native_logs import filtered_native_stderr, is_noise
from tests.support import RunningGateway

NOISE = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796277541.847562   29141 port.cc:153] oneDNN custom operations are on.\n",
    "I0000 00:00:1796277541.851832   29141 cudart_stub.cc:31] Could not find cuda drivers on your machine.\n",
    "E0000 00:00:1796277550.130934   29142 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n",
]
KEPT = [
    "E0000 00:00:1796277550.130934   29142 saver.cc:12] a real error\n",
    "W0000 00:00:1796277550.130934   29142 op_kernel.cc:1] a warning\n",
    "2026-12-03 05:56:18,695 INFO modelyard.registry: model 'mlp' ready\n",
]


def test_the_filter_drops_start_up_noise_and_keeps_the_rest(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    with filtered_native_stderr():
        for line in [*NOISE, *KEPT]:
            os.write(2, line.encode())  # as native code writes: to the descriptor, not sys.stderr
    err = capfd.readouterr().err
    assert err == "".join(KEPT)
    assert all(is_noise(line) for line in NOISE) and not any(is_noise(line) for line in KEPT)


def test_asking_for_tensorflows_logs_turns_the_filter_off(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    with filtered_native_stderr():
        os.write(2, NOISE[1].encode())
    assert capfd.readouterr().err == NOISE[1]


def test_the_gateway_started_quietly(gateway: RunningGateway) -> None:
    output = gateway.output()
    assert "model 'affine_tf' ready" in output  # TensorFlow did start in it
    noise = [line for line in output.splitlines(True) if is_noise(line)]
    assert not noise, noise
    assert "is deprecated" not in output
    assert "INFO tensorflow:" not in output
