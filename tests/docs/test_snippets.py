"""Docs that cannot lie: every shell and Python snippet of the README's quick start and of the pages
in docs/ runs, as written, against the session gateway.

Snippets are written as a user pastes them, against `localhost:8000` (HTTP) and `localhost:8001`
(gRPC), from the checkout's root. The test changes only those addresses, to the session gateway's
ports, and runs each page's blocks in order (a page's later blocks may use what its earlier ones
made) from a folder where `model_repo` is the session gateway's repository and `.venv` this
checkout's environment. Shell blocks run under `set -euo pipefail`, with curl failing on an HTTP
error. A block that cannot run here is marked, on the line before it, `<!-- snippet: skip REASON -->`;
the reason is required.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, RunningGateway

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


def quick_start() -> list[Snippet]:
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"(?ms)^## Quick start\n.*?(?=^## )", readme)
    assert match, "README.md has no '## Quick start' section"
    first_line = readme[: match.start()].count("\n") + 1
    return extract("README.md", match.group(0), first_line)


def pages() -> dict[str, list[Snippet]]:
    found = {"README.md (quick start)": quick_start()}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        name = page.relative_to(ROOT).as_posix()
        found[name] = extract(name, page.read_text())
    return found


def runnable(snippets: list[Snippet]) -> list[Snippet]:
    return [s for s in snippets if s.lang in RUN and s.skip is None]


PAGES = pages()
RUNNABLE = {name: runnable(snippets) for name, snippets in PAGES.items() if runnable(snippets)}


def test_every_skipped_snippet_says_why() -> None:
    unexplained = [f"{s.path}:{s.line}" for ss in PAGES.values() for s in ss if s.skip == ""]
    assert not unexplained, f"snippets marked skip without a reason: {unexplained}"


def test_the_quick_start_and_the_guides_have_snippets_that_run() -> None:
    # The extraction itself must find them, or this test would pass on nothing.
    for page in ("README.md (quick start)", "docs/getting-started.md", "docs/guides/own-model.md",
                 "docs/guides/rollouts.md"):  # fmt: skip
        langs = {RUN[s.lang] for s in RUNNABLE.get(page, [])}
        assert langs >= ({"shell", "python"} if page != "docs/guides/own-model.md" else {"shell"}), page
    readme = [s for s in PAGES["README.md (quick start)"] if s.lang in RUN]
    assert any("make serve" in s.code and s.skip for s in readme), "make serve is marked skip, with why"


def test_a_mark_without_its_block_or_of_another_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="right before a code block"):
        extract("x.md", "<!-- snippet: skip why -->\nsome text\n```sh\necho\n```\n")
    with pytest.raises(ValueError, match="unknown snippet mark 'run'"):
        extract("x.md", "<!-- snippet: run -->\n```sh\necho\n```\n")
    (block,) = extract(
        "x.md", "- a list item:\n\n  <!-- snippet: skip a reason -->\n  ```sh\n  echo hi\n  ```\n"
    )
    assert (block.lang, block.code, block.skip, block.line) == ("sh", "echo hi", "a reason", 4)


@pytest.fixture(scope="module")
def workdir(gateway: RunningGateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where snippets run: a checkout's root as the user sees it, with the session gateway's repository."""
    work = tmp_path_factory.mktemp("snippets")
    (work / "model_repo").symlink_to(gateway.repo, target_is_directory=True)
    (work / ".venv").symlink_to(ROOT / ".venv", target_is_directory=True)
    return work


def for_gateway(code: str, gateway: RunningGateway) -> str:
    ports = {"8000": gateway.http_port, "8001": gateway.grpc_port}
    return ADDRESS.sub(lambda m: f"127.0.0.1:{ports[m['port']]}", code)


def run(snippet: Snippet, gateway: RunningGateway, workdir: Path) -> subprocess.CompletedProcess[str]:
    code = for_gateway(snippet.code, gateway)
    if RUN[snippet.lang] == "shell":
        command = ["bash", "-c", SHELL_PRELUDE + code]
    else:
        command = [sys.executable, "-c", code]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        return subprocess.run(
            command,
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=SNIPPET_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        # What it printed before it hung says where it hung.
        printed = [
            part.decode(errors="replace") if isinstance(part, bytes) else part or ""
            for part in (exc.stdout, exc.stderr)
        ]
        pytest.fail(
            f"{snippet.path}:{snippet.line} ({snippet.lang}) ran past {SNIPPET_TIMEOUT_S} s\n"
            f"--- stdout\n{printed[0][-3000:]}\n--- stderr\n{printed[1][-3000:]}"
        )


@pytest.mark.parametrize("page", sorted(RUNNABLE))
def test_the_page_s_snippets_run_as_written(page: str, gateway: RunningGateway, workdir: Path) -> None:
    before = {p.name for p in gateway.repo.iterdir()}
    try:
        for snippet in RUNNABLE[page]:
            done = run(snippet, gateway, workdir)
            assert done.returncode == 0, (
                f"{snippet.path}:{snippet.line} ({snippet.lang}) exited {done.returncode}\n"
                f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
            )
    finally:
        # A guide that failed half-way leaves its models behind: unload them and take their folders away.
        for name in sorted({p.name for p in gateway.repo.iterdir()} - before):
            httpx.post(f"{gateway.url}/v2/repository/models/{name}/unload", timeout=30)
            shutil.rmtree(gateway.repo / name, ignore_errors=True)
