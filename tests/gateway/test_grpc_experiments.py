"""The gateway imports grpc itself, with GRPC_EXPERIMENTS set to the experiments it turns off for
that moment only: grpc reads the variable once, as it is imported. Processes it starts get the
environment they were given, and an operator's own value is left as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = (
    "import os, sys, json, subprocess; seen = os.environ.get('GRPC_EXPERIMENTS'); import gateway; "
    "child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get(\"GRPC_EXPERIMENTS\"))'], "
    "capture_output=True, text=True).stdout.strip(); "
    "print(json.dumps([seen, 'grpc' in sys.modules, os.environ.get('GRPC_EXPERIMENTS'), child]))"
)


def probe(env: dict[str, str]) -> list[object]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    answer: list[object] = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def test_importing_the_gateway_imports_grpc_and_leaves_the_environment_as_it_was() -> None:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    before, imported, after, child = probe(env)
    assert before is None
    assert imported is True  # grpc was imported by the gateway's package, with the variable set
    assert after is None
    assert child == "None"  # a process the gateway starts does not inherit it


def test_an_operators_grpc_experiments_are_kept() -> None:
    env = {**os.environ, "GRPC_EXPERIMENTS": "-event_engine_client"}
    before, _, after, child = probe(env)
    assert before == after == child == "-event_engine_client"
