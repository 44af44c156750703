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
from gateway.status import (
    CacheStatus,
    GatewayStatus,
    MemoryStatus,
    ModelStatus,
    ModelTraffic,
    ProcessStatus,
    StatusReader,
)

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
            f'<p class="meta">modelyard {escape(status.version)}, up {status.uptime_s:.0f} s, '
            f"gRPC server {escape(status.grpc_server)}; traffic over the last {_window(status)}</p>",
            "<h2>Models</h2>",
            _models_table(status),
            _repository_note(status),
            "<h2>Live traffic</h2>",
            _traffic_table(status.models),
            "<h2>Processes</h2>",
            _process_table(status.processes),
            _memory_line(status.memory),
            "<h2>Workers</h2>",
            _workers_table(status),
        ]
    )


def _window(status: GatewayStatus) -> str:
    windows = [m.traffic.window_s for m in status.models if m.traffic is not None]
    return f"{max(windows):.0f} s" if windows else "few seconds (no requests yet)"


def _cells(*values: str) -> str:
    return "".join(f"<td>{value}</td>" for value in values)


# Longer texts (a backend's error, say) are cut to this many characters; the full text is the
# cell's tooltip, so one long message does not make its row tall.
CUT_AT = 80


def _cut(text: str) -> str:
    if len(text) <= CUT_AT:
        return f'<span class="reason">{escape(text)}</span>'
    return f'<span class="reason cut" title="{escape(text)}">{escape(text[: CUT_AT - 1])}&hellip;</span>'


def _state(state: str, reason: str = "") -> str:
    badge = f'<span class="state state-{escape(state.lower())}">{escape(state)}</span>'
    return badge + (" " + _cut(reason) if reason else "")


def _buttons(status: GatewayStatus, name: str) -> str:
    # One pair of buttons per model: the repository API loads and unloads whole models.
    if not status.repository_api:
        return ""
    name = escape(name)
    return (
        f'<button data-action="load" data-model="{name}">load</button> '
        f'<button data-action="unload" data-model="{name}">unload</button>'
    )


def _models_table(status: GatewayStatus) -> str:
    """Every model the registry holds, one row per version, then what the repository has that is
    not loaded (a failed or unloaded model, a version the policy leaves out): each exactly once."""
    rows: list[str] = []
    shown: set[tuple[str, str]] = set()

    def actions(name: str | None) -> str:
        # The buttons' column exists only where the repository API does.
        if not status.repository_api:
            return ""
        return f"<td>{_buttons(status, name) if name is not None else ''}</td>"

    budget = status.memory.budget_bytes is not None
    # The cache's column, where some model has a response cache.
    caching = any(v.cache is not None for m in status.models for v in m.versions)

    def resident(value: int | None) -> str:
        # Without a budget, versions load side by side and each one's figure can hold the others'
        # memory: it is shown only where it was measured alone.
        if budget or value is None:
            return _mib(value)
        return '<span class="meta" title="measured alone only under a memory budget">-</span>'

    for model in status.models:
        name = escape(model.name)
        twin = f' <span class="meta">(twin of {escape(model.twin_of)})</span>' if model.twin_of else ""
        first = True
        if not model.versions:
            shown.add((model.name, ""))
            rows.append(
                f'<tr data-model="{name}">'
                + _cells(name + twin, "-", escape(model.backend or "-"), _state(model.state, model.reason))
                + _cells("-", "-", "-", "-", "-", "-")
                + ("<td>-</td>" if caching else "")
                + actions(model.name)
                + "</tr>"
            )
        for version in model.versions:
            shown.add((model.name, str(version.version)))
            health = (
                '<span class="health up">up</span>'
                if version.backend_ready
                else '<span class="health down">DOWN</span>'
            )
            breaker = (
                f'<span class="breaker breaker-{escape(version.breaker)}">{escape(version.breaker)}</span>'
                if version.breaker is not None
                else "-"
            )
            # The labels that point at this version, and whether a request naming none gets it.
            names = [escape(label) for label, v in sorted(model.labels.items()) if v == version.version]
            if model.default_version == version.version:
                names.insert(0, "<em>default</em>")
            weight = model.traffic_weights.get(str(version.version))
            rows.append(
                f'<tr data-model="{name}" data-version="{version.version}">'
                + _cells(
                    name + twin if first else "",
                    str(version.version),
                    escape(version.backend),
                    _state(version.state, version.reason),
                )
                + _cells(
                    health,
                    breaker,
                    f'<span class="labels">{", ".join(names) or "-"}</span>',
                    "-" if weight is None else f"{weight:g}",
                )
                + _cells(
                    resident(version.resident_bytes),
                    f"{version.loads} / {version.evictions}",
                )
                + (_cache_cell(version.cache) if caching else "")
                + actions(model.name if first else None)
                + "</tr>"
            )
            first = False
    names_shown = {name for name, _ in shown}
    for entry in status.index:
        if (entry.name, entry.version) in shown or (entry.name in names_shown and not entry.version):
            continue
        first = entry.name not in names_shown
        shown.add((entry.name, entry.version))
        names_shown.add(entry.name)
        rows.append(
            f'<tr data-model="{escape(entry.name)}" data-version="{escape(entry.version)}" class="unloaded">'
            + _cells(escape(entry.name), escape(entry.version or "-"), "-", _state(entry.state, entry.reason))
            + _cells("-", "-", "-", "-", "-", "-")
            + ("<td>-</td>" if caching else "")
            + actions(entry.name if first else None)
            + "</tr>"
        )
    head = (
        "<tr><th>model</th><th>version</th><th>backend</th><th>state</th><th>backend health</th>"
        "<th>breaker</th><th>labels</th><th>traffic weight</th><th>resident</th>"
        "<th>loads / evictions</th>"
        + ("<th>cache hits / misses</th>" if caching else "")
        + ("<th></th>" if status.repository_api else "")
        + "</tr>"
    )
    return f'<table id="models">{head}{"".join(rows) or _empty(11)}</table>'


def _cache_cell(cache: CacheStatus | None) -> str:
    if cache is None:
        return "<td>-</td>"
    return (
        f'<td class="cache" title="{cache.entries} answers kept, {_mib(cache.bytes)}">'
        f"{cache.hits} / {cache.misses}</td>"
    )


def _repository_note(status: GatewayStatus) -> str:
    if status.repository_api:
        return ""
    return '<p class="meta">Load and unload need the repository API: --enable-repository-api.</p>'


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _memory_line(memory: MemoryStatus) -> str:
    counts = f"{memory.loads} loads, {memory.evictions} evictions; load mode {escape(memory.load_mode)}"
    if memory.budget_bytes is None:
        return (
            '<p class="meta" id="memory">models: no memory budget, so versions load side by side and '
            f"their memory is not measured one by one (the processes' RSS is above); {counts}</p>"
        )
    return (
        f'<p class="meta" id="memory">models: {_mib(memory.resident_bytes)} resident '
        f"(and {_mib(memory.retained_bytes)} their unloads kept) of a {_mib(memory.budget_bytes)} budget; "
        f"{counts}</p>"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# An error share at or above this is shown as bad, any above zero as a warning.
BAD_ERROR_RATE = 0.05


def _errors(rate: float) -> str:
    level = "bad" if rate >= BAD_ERROR_RATE else "warn" if rate > 0 else "ok"
    return f'<span class="errors errors-{level}">{rate * 100:.1f} %</span>'


def _traffic_table(models: list[ModelStatus]) -> str:
    rows = []
    for model in models:
        traffic = model.traffic or ModelTraffic(0.0, 0, 0.0, 0.0, None, None)
        rows.append(
            f'<tr data-model="{escape(model.name)}">'
            + _cells(
                escape(model.name),
                f'<span class="rate">{traffic.req_per_s:.1f}</span>',
                _errors(traffic.error_rate),
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


def _empty(columns: int) -> str:
    return f'<tr><td colspan="{columns}">none</td></tr>'


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f3f3f3; }
.meta { color: #666; }
#error { color: #b00; }
.state, .health, .breaker, .errors { padding: 0 4px; border-radius: 3px; font-weight: 600; }
.state-ready, .health.up, .breaker-closed, .errors-ok { color: #1a7f37; }
.state-loading, .state-unloading, .breaker-half_open, .errors-warn { color: #7d4e00; background: #fff4d6; }
.state-unavailable, .health.down, .breaker-open, .errors-bad { color: #fff; background: #cf222e; }
.reason { color: #555; }
.reason.cut { cursor: help; border-bottom: 1px dotted #999; }
tr.unloaded td { color: #777; }
#models td:last-child { white-space: nowrap; }
#models .reason { font-size: 12px; }
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
