"""Docs that cannot lie, the machinery: the fenced blocks of a Markdown page with their skip marks,
and running one as a user pastes it against a running gateway.

Snippets are written against `localhost:8000` (HTTP) and `localhost:8001` (gRPC), from the
checkout's root. Only those addresses change, to the gateway's ports. Shell blocks run under
`set -euo pipefail`, with curl failing on an HTTP error. A block that cannot run where the docs
test runs is marked, on the line before it, `<!-- snippet: skip REASON -->`; the reason is
required. A reason that starts with `walkthrough:` names the test that runs the block instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.gateways import ROOT, RunningGateway

RUN = {"bash": "shell", "sh": "shell", "shell": "shell", "python": "python", "py": "python"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+)(?P<lang>[\w+-]*)[^`]*$")
MARK = re.compile(r"^\s*<!--\s*snippet:(?P<body>.*?)-->\s*$")
ADDRESS = re.compile(r"\b(?:localhost|127\.0\.0\.1):(?P<port>800[01])\b")
# Curl as the user types it, but an HTTP error fails the block instead of printing a body.
SHELL_PRELUDE = (
    'set -euo pipefail\ncurl() { command curl --fail-with-body --show-error --max-time 60 "$@"; }\n'
)
SNIPPET_TIMEOUT_S = 180


@dataclass(frozen=True)
class Snippet:
    path: str
    line: int
    lang: str
    code: str
    skip: str | None  # the reason, when the block is marked skip


def extract(path: str, text: str, first_line: int = 1) -> list[Snippet]:
    """The fenced blocks of a Markdown text, with the skip mark that precedes each one."""
    lines = text.splitlines()
    found: list[Snippet] = []
    mark: tuple[int, str] | None = None
    index = 0
    while index < len(lines):
        line = lines[index]
        marked = MARK.match(line)
        if marked:
            mark = (first_line + index, marked["body"].strip())
            index += 1
            continue
        fence = FENCE.match(line)
        if not fence:
            if line.strip():
                if mark is not None:
                    raise ValueError(f"{path}:{mark[0]}: a snippet mark must come right before a code block")
                mark = None
            index += 1
            continue
        indent, close, fence_line = len(fence["indent"]), fence["fence"], first_line + index
        body: list[str] = []
        index += 1
        while index < len(lines) and lines[index].strip() != close:
            body.append(lines[index][indent:] if lines[index][:indent].strip() == "" else lines[index])
            index += 1
        index += 1  # the closing fence
        skip = None
        if mark is not None:
            kind, _, reason = mark[1].partition(" ")
            if kind != "skip":
                raise ValueError(f"{path}:{mark[0]}: unknown snippet mark '{kind}' (only 'skip REASON')")
            skip = reason.strip()
        found.append(Snippet(path, fence_line, fence["lang"].lower(), "\n".join(body), skip))
        mark = None
    return found


def for_gateway(code: str, gateway: RunningGateway) -> str:
    ports = {"8000": gateway.http_port, "8001": gateway.grpc_port}
    return ADDRESS.sub(lambda m: f"127.0.0.1:{ports[m['port']]}", code)


def run(
    snippet: Snippet, gateway: RunningGateway, workdir: Path, timeout_s: float = SNIPPET_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    code = for_gateway(snippet.code, gateway)
    if RUN[snippet.lang] == "shell":
        command = ["bash", "-c", SHELL_PRELUDE + code]
    else:
        command = [sys.executable, "-c", code]
    # The gateway's address for commands that default to localhost:8000 (modelyard migrate's live
    # steps), as the address rewrite is for the ones that spell it out.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MODELYARD_GATEWAY_URL": gateway.url}
    try:
        return subprocess.run(
            command,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # What it printed before it hung says where it hung.
        printed = [
            part.decode(errors="replace") if isinstance(part, bytes) else part or ""
            for part in (exc.stdout, exc.stderr)
        ]
        pytest.fail(
            f"{snippet.path}:{snippet.line} ({snippet.lang}) ran past {timeout_s:g} s\n"
            f"--- stdout\n{printed[0][-3000:]}\n--- stderr\n{printed[1][-3000:]}"
        )
