"""The status page in a real browser: Debian's chromium (make browser-tools) driven by Playwright."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

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
    running = start_gateway(repo, tmp_path / "gateway.log", "--enable-repository-api")
    yield running
    running.stop()


def send_traffic(url: str, stop: threading.Event) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
    with httpx.Client(base_url=url, timeout=5) as client:
        deadline = time.monotonic() + 30  # bounded, whatever happens to the test
        while not stop.is_set() and time.monotonic() < deadline:
            client.post("/v2/models/mlp/infer", json=body)
            time.sleep(0.005)


def test_page_shows_traffic_and_unloads_a_model(api_gateway: RunningGateway) -> None:
    from playwright.sync_api import sync_playwright

    requested: list[str] = []
    stop = threading.Event()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--headless", "--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("request", lambda request: requested.append(request.url))
            page.goto(api_gateway.url + "/")
            rate = page.locator('#traffic tr[data-model="mlp"] .rate')
            assert float(rate.inner_text()) == 0.0
            sender = threading.Thread(target=send_traffic, args=(api_gateway.url, stop))
            sender.start()
            try:
                # The page refreshes itself every 2 s: the rate moves without a reload.
                page.wait_for_function(
                    """() => parseFloat(document.querySelector('#traffic tr[data-model="mlp"] .rate').textContent) > 0""",
                    timeout=20_000,
                )
            finally:
                stop.set()
                sender.join(timeout=10)
            p50 = page.locator('#traffic tr[data-model="mlp"] td').nth(3).inner_text()
            assert float(p50) > 0
            state = page.locator('#index tr[data-model="affine"] .state').first
            assert state.inner_text() == "READY"
            page.click('button[data-action="unload"][data-model="affine"]')
            page.wait_for_function(
                """() => document.querySelector('#index tr[data-model="affine"] .state').textContent === 'UNAVAILABLE'""",
                timeout=20_000,
            )
            assert page.locator('#models tr[data-model="affine"]').count() == 0
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "status-page.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"status page screenshot: {shot}")
        finally:
            browser.close()
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert requested and all(url.startswith(api_gateway.url) for url in requested), requested
    status = httpx.get(api_gateway.url + "/v2/models/affine/ready")
    assert status.status_code in (404, 503)
