"""One inference request per backend through the gateway of the compose stack (`make compose-smoke`).

    python deploy/smoke.py [--url http://127.0.0.1:8000] [--wait-s 300] [--only MODEL ...]

Waits until the gateway answers ready, then for each model: waits for the model to be ready, sends one
v2 REST inference request, checks the output's name and shape, and checks in `/metrics` that the
request was counted against the backend it was meant for. Exit 0 when every case passed, 1 otherwise,
with one line per case.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Case:
    model: str
    backend: str
    input_name: str
    width: int
    output_name: str
    output_width: int


# The compose stack's models (deploy/compose-model-repo/README.md): one per backend.
CASES = (
    Case("affine", "onnxruntime", "x", 4, "y", 3),
    Case("mlp_torch", "torchserve", "input", 64, "logits", 10),
    Case("affine_tf", "tfserving", "x", 4, "y", 3),
)


class SmokeFailure(Exception):
    pass


def wait_until(client: httpx.Client, path: str, deadline: float) -> None:
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = client.get(path)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:200]}"
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(1)
    raise SmokeFailure(f"GET {path} did not answer 200 in time (last: {last})")


def served_count(client: httpx.Client, case: Case) -> float:
    """Successful requests the gateway counted for this model on this backend."""
    pattern = re.compile(
        r"^modelyard_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$",
        re.MULTILINE,
    )
    total = 0.0
    for match in pattern.finditer(client.get("/metrics").text):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
        if (labels.get("model"), labels.get("backend"), labels.get("code")) == (
            case.model,
            case.backend,
            "200",
        ):
            total += float(match["value"])
    return total


def run_case(client: httpx.Client, case: Case, deadline: float) -> str:
    wait_until(client, f"/v2/models/{case.model}/ready", deadline)
    before = served_count(client, case)
    batch = 2
    body = {
        "inputs": [
            {
                "name": case.input_name,
                "datatype": "FP32",
                "shape": [batch, case.width],
                "data": [float(i % 7) / 7 for i in range(batch * case.width)],
            }
        ]
    }
    answer = client.post(f"/v2/models/{case.model}/infer", json=body)
    if answer.status_code != 200:
        raise SmokeFailure(f"infer answered {answer.status_code}: {answer.text[:300]}")
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    output = outputs.get(case.output_name)
    if output is None or output["shape"] != [batch, case.output_width]:
        raise SmokeFailure(
            f"expected output {case.output_name} [{batch}, {case.output_width}], got {outputs}"
        )
    if served_count(client, case) <= before:
        raise SmokeFailure(f"/metrics counted no successful request on backend {case.backend}")
    return f"version {answer.json()['model_version']}, {case.output_name} {output['shape']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the gateway's HTTP address")
    parser.add_argument("--wait-s", type=float, default=300, help="how long to wait for readiness")
    parser.add_argument("--only", nargs="*", default=None, metavar="MODEL", help="run only these models")
    args = parser.parse_args(argv)
    cases = [c for c in CASES if args.only is None or c.model in args.only]
    if not cases:
        print(f"no case for {args.only}; known: {', '.join(c.model for c in CASES)}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + args.wait_s
    failed = 0
    with httpx.Client(base_url=args.url, timeout=30) as client:
        try:
            wait_until(client, "/v2/health/ready", deadline)
        except SmokeFailure as exc:
            print(f"FAIL  gateway at {args.url}: {exc}")
            return 1
        for case in cases:
            try:
                print(f"ok    {case.model} ({case.backend}): {run_case(client, case, deadline)}")
            except (SmokeFailure, httpx.HTTPError, KeyError, ValueError) as exc:
                failed += 1
                print(f"FAIL  {case.model} ({case.backend}): {exc}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
