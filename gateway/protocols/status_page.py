"""The status page at `/`, and the read-only JSON it is made from at `/status`.

The page is rendered here, on the server; a small inline script fetches `/status/panel` (the same
sections as HTML) every few seconds and swaps them in, and sends the load/unload buttons' requests to
the repository API. Nothing is loaded from anywhere else.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Response

from gateway.auth import request_access
from gateway.protocols.v2_rest import json_response
from gateway.status import GatewayStatus, MemoryStatus, ModelStatus, ModelTraffic, ProcessStatus, StatusReader

REFRESH_MS = 2000


def status_router(reader: StatusReader) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> Response:
        return Response(
            render_page(await reader.read(request_access.get())), media_type="text/html; charset=utf-8"
        )

    @router.get("/status/panel", include_in_schema=False)
    async def panel() -> Response:
        return Response(
            render_panel(await reader.read(request_access.get())), media_type="text/html; charset=utf-8"
        )

    @router.get("/status", include_in_schema=False)
    async def status() -> Response:
        return json_response((await reader.read(request_access.get())).as_json())

    return router


def render_page(status: GatewayStatus) -> str:
    return _PAGE.format(
        version=escape(status.version), refresh_ms=REFRESH_MS, panel=render_panel(status), style=_STYLE
    )


def render_panel(status: GatewayStatus) -> str:
    return "\n".join(
        [
            f'<p class="meta">modelyard {escape(status.version)}, up {status.uptime_s:.0f} s; '
            f"traffic over the last {_window(status)}</p>",
            "<h2>Models</h2>",
            _models_table(status.models),
            "<h2>Live traffic</h2>",
            _traffic_table(status.models),
            "<h2>Processes</h2>",
            _process_table(status.processes),
            _memory_line(status.memory),
            "<h2>Workers</h2>",
            _workers_table(status),
            "<h2>Repository</h2>",
            _index_table(status),
        ]
    )


def _window(status: GatewayStatus) -> str:
    windows = [m.traffic.window_s for m in status.models if m.traffic is not None]
    return f"{max(windows):.0f} s" if windows else "few seconds (no requests yet)"


def _cells(*values: str) -> str:
    return "".join(f"<td>{value}</td>" for value in values)


def _models_table(models: list[ModelStatus]) -> str:
    rows = []
    for model in models:
        labels = ", ".join(f"{escape(k)}&rarr;{v}" for k, v in sorted(model.labels.items())) or "-"
        weights = ", ".join(f"v{escape(k)}: {w:g}" for k, w in sorted(model.traffic_weights.items())) or "-"
        twin = f" (twin of {escape(model.twin_of)})" if model.twin_of else ""
        if not model.versions:
            rows.append(
                f'<tr data-model="{escape(model.name)}">'
                + _cells(escape(model.name) + twin, "-", escape(model.backend or "-"), escape(model.state))
                + _cells("-", "-", labels, weights, "-", "-")
                + "</tr>"
            )
        for version in model.versions:
            health = "up" if version.backend_ready else "DOWN"
            breaker = escape(version.breaker) if version.breaker is not None else "-"
            state = escape(version.state) + (f" ({escape(version.reason)})" if version.reason else "")
            rows.append(
                f'<tr data-model="{escape(model.name)}" data-version="{version.version}">'
                + _cells(escape(model.name) + twin, str(version.version), escape(version.backend), state)
                + _cells(health, breaker, labels, weights)
                + _cells(_mib(version.resident_bytes), f"{version.loads} / {version.evictions}")
                + "</tr>"
            )
    head = "<tr><th>model</th><th>version</th><th>backend</th><th>state</th><th>backend health</th><th>breaker</th><th>labels</th><th>traffic weights</th><th>resident</th><th>loads / evictions</th></tr>"
    return f'<table id="models">{head}{"".join(rows) or _empty(10)}</table>'


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _memory_line(memory: MemoryStatus) -> str:
    budget = "no budget" if memory.budget_bytes is None else f"of a {_mib(memory.budget_bytes)} budget"
    return (
        f'<p class="meta" id="memory">models: {_mib(memory.resident_bytes)} resident '
        f"(and {_mib(memory.retained_bytes)} their unloads kept) {budget}; "
        f"{memory.loads} loads, {memory.evictions} evictions; load mode {escape(memory.load_mode)}</p>"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _traffic_table(models: list[ModelStatus]) -> str:
    rows = []
    for model in models:
        traffic = model.traffic or ModelTraffic(0.0, 0, 0.0, 0.0, None, None)
        rows.append(
            f'<tr data-model="{escape(model.name)}">'
            + _cells(
                escape(model.name),
                f'<span class="rate">{traffic.req_per_s:.1f}</span>',
                f"{traffic.error_rate * 100:.1f} %",
                _ms(traffic.p50_ms),
                _ms(traffic.p99_ms),
                str(traffic.requests),
            )
            + "</tr>"
        )
    head = "<tr><th>model</th><th>req/s</th><th>errors</th><th>p50 ms</th><th>p99 ms</th><th>requests in window</th></tr>"
    return f'<table id="traffic">{head}{"".join(rows) or _empty(6)}</table>'


def _process_table(processes: list[ProcessStatus]) -> str:
    if not processes:
        return '<p class="meta">Process details (pids, memory) are shown to an admin key only.</p>'
    rows = [
        "<tr>"
        + _cells(
            escape(p.name),
            str(p.pid),
            "-" if p.rss_bytes is None else f"{p.rss_bytes / 2**20:.0f} MiB",
            escape(", ".join(p.serves)) or "-",
        )
        + "</tr>"
        for p in processes
    ]
    head = "<tr><th>process</th><th>pid</th><th>RSS</th><th>serves</th></tr>"
    return f'<table id="processes">{head}{"".join(rows)}</table>'


def _workers_table(status: GatewayStatus) -> str:
    count = f'<p class="meta" id="worker-count">{status.worker_count} serving process(es)'
    if not status.workers:
        return f"{count}; details (pids, memory) are shown to an admin key only.</p>"
    rows = [
        f'<tr data-worker="{w.index}">'
        + _cells(
            str(w.index),
            str(w.pid),
            f"{w.up_s:.0f} s",
            str(w.restarts),
            "serving" if w.ready else "starting",
            _mib(w.rss_bytes),
        )
        + "</tr>"
        for w in status.workers
    ]
    supervisor = "" if status.supervisor_pid is None else f" under supervisor pid {status.supervisor_pid}"
    head = "<tr><th>worker</th><th>pid</th><th>up</th><th>restarts</th><th>state</th><th>RSS</th></tr>"
    return f'{count}{supervisor}</p><table id="workers">{head}{"".join(rows)}</table>'


def _index_table(status: GatewayStatus) -> str:
    rows = []
    seen: set[str] = set()
    for entry in status.index:
        buttons = ""
        # One pair of buttons per model: the repository API loads and unloads whole models.
        if status.repository_api and entry.name not in seen:
            name = escape(entry.name)
            buttons = (
                f'<button data-action="load" data-model="{name}">load</button> '
                f'<button data-action="unload" data-model="{name}">unload</button>'
            )
        seen.add(entry.name)
        rows.append(
            f'<tr data-model="{escape(entry.name)}">'
            + _cells(
                escape(entry.name),
                escape(entry.version or "-"),
                f'<span class="state">{escape(entry.state)}</span>',
                escape(entry.reason),
                buttons,
            )
            + "</tr>"
        )
    note = (
        ""
        if status.repository_api
        else '<p class="meta">Load and unload need the repository API: --enable-repository-api.</p>'
    )
    head = "<tr><th>model</th><th>version</th><th>state</th><th>reason</th><th></th></tr>"
    return f'<table id="index">{head}{"".join(rows) or _empty(5)}</table>{note}'


def _empty(columns: int) -> str:
    return f'<tr><td colspan="{columns}">none</td></tr>'


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
.meta { color: #666; }
#error { color: #b00; }
"""

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelyard {version}</title>
<style>{style}</style></head>
<body>
<h1>modelyard</h1>
<p id="error"></p>
<div id="panel">{panel}</div>
<script>
(() => {{
  const panel = document.getElementById("panel");
  const error = document.getElementById("error");
  async function refresh() {{
    try {{
      const response = await fetch("/status/panel", {{cache: "no-store"}});
      if (!response.ok) throw new Error("HTTP " + response.status);
      panel.innerHTML = await response.text();
      error.textContent = "";
    }} catch (e) {{
      error.textContent = "status not updated: " + e.message;
    }}
  }}
  panel.addEventListener("click", async (event) => {{
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    button.disabled = true;
    const url = "/v2/repository/models/" + encodeURIComponent(button.dataset.model) + "/" + button.dataset.action;
    const response = await fetch(url, {{method: "POST"}});
    if (!response.ok) error.textContent = button.dataset.action + " " + button.dataset.model + ": " + (await response.text());
    await refresh();
  }});
  setInterval(refresh, {refresh_ms});
}})();
</script>
</body></html>
"""
