"""docs/backends/ against the registry: a page per backend, naming its artifacts and extra, with one
row per key of its options model and no row for a key it does not have, and a row in the overview."""

from __future__ import annotations

import re

import pytest

from adapters import BACKENDS
from gateway.breaker import GuardOptions
from tests.support import ROOT

PAGES = ROOT / "docs" / "backends"
NAV = (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_backend_has_its_page_with_every_option(backend: str) -> None:
    adapter = BACKENDS[backend]
    page = PAGES / f"{backend}.md"
    assert page.is_file(), f"docs/backends/{backend}.md is missing"
    assert f"backends/{backend}.md" in NAV, "the page is in mkdocs.yml's nav"
    doc = page.read_text()
    options = doc.split("\n## Options", 1)
    assert len(options) == 2, f"docs/backends/{backend}.md has no '## Options' section"
    documented = re.findall(r"(?m)^\| `(\w+)` \|", options[1])
    assert documented == list(adapter.options_model.model_fields), "rows in the options model's order"
    text = " ".join(doc.split())
    for artifact in adapter.artifacts:
        assert f"`{artifact}" in text, artifact
    assert (f"Extra: `{adapter.extra}`" if adapter.extra else "Extra: none") in text
    assert ("remote" in text) if adapter.remote else ("In-process" in text or "Managed" in text)
    for alias in adapter.aliases:
        assert f"alias: `{alias}`" in text


def test_the_overview_lists_every_backend_and_no_other() -> None:
    overview = (PAGES / "index.md").read_text()
    listed = re.findall(r"(?m)^\| \[(\w+)\]\((\w+)\.md\) \|", overview)
    assert sorted(name for name, _ in listed) == sorted(BACKENDS)
    assert all(name == page for name, page in listed)


def test_the_resilience_keys_are_described_once() -> None:
    overview = (PAGES / "index.md").read_text()
    section = overview.split("\n## Resilience", 1)[1].split("\n## ", 1)[0]
    for key in GuardOptions.model_fields:
        assert f"`{key}`" in section, key
