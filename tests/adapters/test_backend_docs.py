"""docs/backends.md against the registry: a section per backend, naming its artifacts and extra,
with one row per key of its options model and no row for a key it does not have."""

from __future__ import annotations

import re

import pytest

from adapters import BACKENDS
from gateway.breaker import GuardOptions
from tests.support import ROOT

DOC = (ROOT / "docs" / "backends.md").read_text()


def sections() -> dict[str, str]:
    parts = re.split(r"(?m)^## ", DOC)
    return {part.split("\n", 1)[0].strip(): part for part in parts[1:]}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_each_backend_has_its_section_with_every_option(backend: str) -> None:
    adapter = BACKENDS[backend]
    section = sections().get(backend)
    assert section is not None, f"docs/backends.md has no '## {backend}' section"
    documented = re.findall(r"(?m)^\| `(\w+)` \|", section)
    assert documented == list(adapter.options_model.model_fields), "rows in the options model's order"
    text = " ".join(section.split())
    for artifact in adapter.artifacts:
        assert f"`{artifact}" in text, artifact
    assert (f"Extra: `{adapter.extra}`" if adapter.extra else "Extra: none") in text
    assert ("remote" in text) if adapter.remote else ("In-process" in text or "Managed" in text)
    for alias in adapter.aliases:
        assert f"alias: `{alias}`" in text


def test_the_resilience_keys_are_described_once() -> None:
    intro = DOC.split("\n## ", 1)[0]
    for key in GuardOptions.model_fields:
        assert f"`{key}`" in intro, key
