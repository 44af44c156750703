"""Docs that cannot lie: every shell and Python snippet of the README's quick start and of the pages
in docs/ runs, as written, against the session gateway.

Snippets are written as a user pastes them, against `localhost:8000` (HTTP) and `localhost:8001`
(gRPC), from the checkout's root. The test changes only those addresses, to the session gateway's
ports, and runs each page's blocks in order (a page's later blocks may use what its earlier ones
made) from a folder where `model_repo` is the session gateway's repository and `.venv` this
checkout's environment. Shell blocks run under `set -euo pipefail`, with curl failing on an HTTP
error. A block that cannot run here is marked, on the line before it, `<!-- snippet: skip REASON -->`;
the reason is required. A reason that starts with `walkthrough:` names the test that runs the block
instead, against a gateway of its own (a walkthrough that needs a managed TorchServe, say).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.support import ROOT, RunningGateway
from tests.support.snippets import RUN, Snippet, extract, run


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


def test_every_walkthrough_block_is_run_by_the_test_it_names() -> None:
    named = [s for ss in PAGES.values() for s in ss if (s.skip or "").startswith("walkthrough:")]
    assert named, "no page has walkthrough blocks: this test would check nothing"
    for snippet in named:
        test = re.search(r"tests/\S+\.py", snippet.skip or "")
        assert test, f"{snippet.path}:{snippet.line}: a walkthrough mark names the test file that runs it"
        source = (ROOT / test.group(0)).read_text()
        assert snippet.path in source, f"{test.group(0)} does not run {snippet.path}"


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
