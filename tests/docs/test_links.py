"""The Markdown files outside the docs site (the README, CONTRIBUTING.md, benchmarks/README.md) link
only to files that exist, and to headings that exist in them; `mkdocs build --strict` checks docs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import ROOT

FILES = ["README.md", "CONTRIBUTING.md", "benchmarks/README.md"]
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """Heading ids as GitHub and MkDocs' toc make them: lower case, punctuation dropped, spaces to '-'."""
    ids = set()
    for heading in re.findall(r"(?m)^#+ (.+)$", markdown):
        ids.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return ids


def links(path: Path) -> list[str]:
    text = re.sub(r"(?s)```.*?```", "", path.read_text())  # code blocks hold no links
    return [m["target"] for m in LINK.finditer(text) if not re.match(r"[a-z]+:", m["target"])]


def broken_links(source: Path) -> list[str]:
    broken = []
    for target in links(source):
        file_part, _, anchor = target.partition("#")
        path = (source.parent / file_part).resolve() if file_part else source
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in anchors(path.read_text())):
            broken.append(target)
    return broken


@pytest.mark.parametrize("name", FILES)
def test_relative_links_resolve(name: str) -> None:
    broken = broken_links(ROOT / name)
    assert not broken, f"{name}: broken links {broken}"


def test_the_check_finds_a_broken_link(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## A heading, with `code`\n\n[ok](#a-heading-with-code) [ok](other.md#other-page) "
        "[gone](missing.md) [no](#nowhere) [no](other.md#nowhere) [web](https://example.org/x)\n"
        "```sh\n[not a link](in-code.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md", "#nowhere", "other.md#nowhere"]
