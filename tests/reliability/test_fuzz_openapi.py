"""Schemathesis against the gateway's own OpenAPI document (/openapi.json), over real HTTP.

Every operation is fuzzed with bodies, paths and queries that fit its schema (the infer, predict
and index bodies are declared in gateway/protocols/openapi.py) and with ones that break it, both
with random model names and with a real model's; no answer may be a 5xx, and the gateway must
serve on afterwards. The case counts are printed at the end of the run ("fuzz cases run");
MODELYARD_FUZZ_API_EXAMPLES raises them.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import httpx
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.support import FUZZ_CASES, RunningGateway

EXAMPLES = int(os.environ.get("MODELYARD_FUZZ_API_EXAMPLES", "5"))
REAL_MODEL = {"model_name": "affine", "model_version": "1", "model_label": "stable"}


def fuzz_operation(
    operation: Any, url: str, session: requests.Session, mode: schemathesis.GenerationMode, real_model: bool
) -> int:
    """Runs one operation's generated cases; how many ran."""
    path_parameters = None
    if real_model:
        names = {p.name for p in operation.path_parameters}
        path_parameters = {k: v for k, v in REAL_MODEL.items() if k in names} or None
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)
    ran = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        nonlocal ran
        ran += 1
        response = case.call(base_url=url, session=session, timeout=60)
        # 501 (not implemented: classify, regress) and 503 (a model the fuzzer unloaded) are answers
        # the error table gives on purpose; a 500 is a bug.
        assert response.status_code < 500 or response.status_code in (501, 503), (
            f"{response.status_code} {response.text[:300]}\n{case.as_curl_command()}"
        )
        if response.status_code >= 400:
            assert "error" in response.json()

    # Nothing breaks the schema of a route with no inputs: its negative run is unsatisfiable.
    with contextlib.suppress(Unsatisfiable):
        run()
    return ran


def test_no_operation_answers_a_server_error(limited_gateway: RunningGateway) -> None:
    """On the gateway with small limits (conftest.LIMITED_ENV), so that fuzzing crosses them too."""
    fuzzed = limited_gateway
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    session = requests.Session()
    assert len(operations) >= 30
    assert any("requestBody" in op.definition.raw for op in operations if op.path.endswith("/infer"))
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            for real_model in (False, True) if "{model_name}" in operation.path else (False,):
                ran = fuzz_operation(operation, fuzzed.url, session, mode, real_model)
                key = f"schemathesis {mode.value}"
                FUZZ_CASES[key] = FUZZ_CASES.get(key, 0) + ran
                assert ran > 0 or mode is schemathesis.GenerationMode.NEGATIVE, label
    good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    with httpx.Client(base_url=fuzzed.url, timeout=30) as client:
        client.post("/v2/repository/models/affine/load")  # fuzzing may have unloaded it
        assert client.post("/v2/models/affine/infer", json=good).status_code == 200
