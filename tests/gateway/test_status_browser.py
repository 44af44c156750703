"""The status page in a real browser: Debian's chromium (make browser-tools) driven by Playwright."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.protocols.status_page import CUT_AT
from tests.support import ROOT, RunningGateway, start_gateway

CHROMIUM = Path("/usr/bin/chromium")
# Screenshots the tests keep; the folder is gitignored.
ARTIFACTS = ROOT / "test-artifacts"


def browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing: `make browser-tools` installs Debian's chromium (as root, with apt)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    return None


pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))


@pytest.fixture
def api_gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    repo = tmp_path / "repo"
    for name in ("affine", "mlp"):
        shutil.copytree(ROOT / "model_repo" / name, repo / name)
    # A model that cannot load: its reason, a backend's long message, belongs in the models table.
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx graph " * 8)
    running = start_gateway(repo, tmp_path / "gateway.log", "--enable-repository-api")
    yield running
    running.stop()


MLP_BODY = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}


def send_traffic(url: str, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=5) as client:
        deadline = time.monotonic() + 30  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < deadline:
            client.post("/v2/models/mlp/infer", json=MLP_BODY)
            time.sleep(0.005)


def colour(page: Any, selector: str) -> tuple[int, ...]:
    """The computed background colour of the first element `selector` finds, as (r, g, b[, a])."""
    value = page.eval_on_selector(selector, "e => getComputedStyle(e).backgroundColor")
    return tuple(int(float(part)) for part in value[value.index("(") + 1 : -1].split(","))


def is_red(rgb: tuple[int, ...]) -> bool:
    return len(rgb) == 3 and rgb[0] > 150 and rgb[1] < 100 and rgb[2] < 100


def expected_labels(status: dict[str, Any], name: str) -> dict[str, str]:
    (model,) = [m for m in status["models"] if m["name"] == name]
    assert set(model["labels"].values()) == {1, 2}
    cells = {}
    for version in model["versions"]:
        number = version["version"]
        names = sorted(label for label, v in model["labels"].items() if v == number)
        if model["default_version"] == number:
            names.insert(0, "default")
        cells[str(number)] = ", ".join(names)
    return cells


def test_page_reads_at_a_glance_and_unloads_a_model(api_gateway: RunningGateway) -> None:
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    stop = threading.Event()
    with httpx.Client(base_url=api_gateway.url, timeout=5) as client:
        for _ in range(30):  # traffic before the page is first opened
            assert client.post("/v2/models/mlp/infer", json=MLP_BODY).status_code == 200
        for _ in range(5):
            assert client.post("/v2/models/broken/infer", json=MLP_BODY).status_code == 503
        status = client.get("/status").json()
    (broken,) = [m for m in status["models"] if m["name"] == "broken"]
    reason = broken["reason"] or broken["versions"][0]["reason"]
    assert len(reason) > CUT_AT, reason  # the case of a long message is what this covers
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--headless", "--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(api_gateway.url + "/")
            # Traffic on the first load: the requests sent before the page was opened.
            mlp_traffic = page.locator('#traffic tr[data-model="mlp"] td')
            first_count = int(mlp_traffic.nth(5).inner_text())
            assert first_count >= 30 and float(mlp_traffic.nth(1).inner_text()) > 0
            assert "no requests yet" not in page.inner_text("#panel")
            # The failed model's reason sits in its row of the models table, cut, in full on hover.
            failed = page.locator('#models tr[data-model="broken"]')
            assert failed.count() == 1
            assert failed.locator(".state").inner_text() == "UNAVAILABLE"
            shown = failed.locator(".reason")
            assert shown.get_attribute("title") == reason
            assert len(shown.inner_text()) <= CUT_AT < len(reason)
            row_height = failed.bounding_box()["height"]
            ready_height = page.locator('#models tr[data-model="mlp"]').bounding_box()["height"]
            assert row_height <= 2 * ready_height
            # Coloured: an unavailable state and a 100 % error rate stand out; a ready one does not.
            assert is_red(colour(page, '#models tr[data-model="broken"] .state'))
            assert is_red(colour(page, '#traffic tr[data-model="broken"] .errors'))
            assert not is_red(colour(page, '#models tr[data-model="mlp"] .state'))
            assert not is_red(colour(page, '#traffic tr[data-model="mlp"] .errors'))
            # Labels point at their versions (affine: stable -> 1, canary -> 2), beside the default.
            labels = {
                row.get_attribute("data-version"): row.locator(".labels").inner_text()
                for row in page.locator('#models tr[data-model="affine"]').all()
            }
            assert labels == expected_labels(status, "affine")
            # No repeated table: each model version once, in the one models table.
            assert page.locator("#index").count() == 0
            tables = page.eval_on_selector_all("table", "tables => tables.map(t => t.id)")
            assert sorted(tables) == ["models", "processes", "traffic", "workers"]
            sender = threading.Thread(target=send_traffic, args=(api_gateway.url, stop))
            sender.start()
            try:
                # The page refreshes itself every 2 s: the figures move without a reload.
                page.wait_for_function(
                    f"""() => parseInt(document.querySelectorAll('#traffic tr[data-model="mlp"] td')[5].textContent) > {first_count}""",
                    timeout=20_000,
                )
            finally:
                stop.set()
                sender.join(timeout=10)
            p50 = page.locator('#traffic tr[data-model="mlp"] td').nth(3).inner_text()
            assert float(p50) > 0
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"status page screenshot: {shot}")
            assert page.locator('#models tr[data-model="affine"] .state').first.inner_text() == "READY"
            page.click('button[data-action="unload"][data-model="affine"]')
            page.wait_for_function(
                """() => document.querySelector('#models tr[data-model="affine"] .state').textContent === 'UNAVAILABLE'""",
                timeout=20_000,
            )
            page.screenshot(path=str(ARTIFACTS / "status-page-unloaded.png"), full_page=True)
        finally:
            browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert requested and all(url.startswith(api_gateway.url) for url in requested), requested
    status = httpx.get(api_gateway.url + "/v2/models/affine/ready")
    assert status.status_code in (404, 503)
