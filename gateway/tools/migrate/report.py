"""`migrate report`: one HTML page on a migration, from its state file, with its plots inline (as
`modelyard bench`'s report does, gateway/tools/lab/report.py), so it opens offline.

It shows the check's result, the shadow's agreement (the histogram of each compared request's
largest absolute difference), the latency of each side before (under shadow) and after (at each
promote step), and the step history with its rollbacks.
"""

from __future__ import annotations

import base64
import math
import time
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from gateway.tools.lab.report import ReportError, require_plotting, save_plot
from gateway.tools.migrate import state
from gateway.tools.migrate.state import Migration, MigrationError

PLOTS = {
    "latency.png": "Latency of each side: under shadow, then at each promote step",
    "agreement.png": "Largest absolute difference per compared request (shadow)",
}


@dataclass(frozen=True, slots=True)
class ReportOptions:
    # The report's folder: STATE_DIR/MODEL-report when None.
    out: Path | None = None


@dataclass(frozen=True, slots=True)
class ReportResult:
    html: Path
    files: list[Path]


def report(
    model: str, model_repo: Path, state_dir: Path, gateway_url: str | None, options: ReportOptions
) -> ReportResult:
    """Reads only the state: the gateway need not run (`gateway_url` is accepted for the steps'
    common shape)."""
    migration = state.load(state_dir, model)
    folder = options.out or state_dir / f"{model}-report"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        require_plotting()
    except (OSError, ReportError) as exc:
        raise MigrationError(f"cannot write the report to {folder}: {exc}") from exc
    plots = _plot(migration, folder)
    html = folder / "report.html"
    html.write_text(render_html(migration, {p.name: p.read_bytes() for p in plots}))
    return ReportResult(html, [html, *plots])


def _phases(migration: Migration) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, source side, new side) under shadow, then for each judged promote step in order."""
    found = []
    figures = (migration.steps.get("status") or {}).get("figures")
    if figures:
        found.append(("shadow", figures["source"], figures["new"]))
    for event in migration.history:
        if event.get("step") == "promote" and "new" in event and "percent" in event:
            found.append((f"{event['percent']:g}%", event["source"], event["new"]))
    return found


def _plot(migration: Migration, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    phases = _phases(migration)
    if phases:
        figure, axes = plt.subplots(figsize=(9, 4.2))
        series = [("source", "p50_ms", "C0", 0.45), ("source", "p99_ms", "C0", 1.0),
                  ("new", "p50_ms", "C1", 0.45), ("new", "p99_ms", "C1", 1.0)]  # fmt: skip
        width = 0.8 / len(series)
        for index, (which, key, colour, alpha) in enumerate(series):
            values = [(s if which == "source" else n).get(key) for _, s, n in phases]
            xs = [i + (index - 1.5) * width for i in range(len(phases))]
            label = f"{migration.model if which == 'source' else migration.deployment} {key[:3]}"
            axes.bar(
                xs, [v if v is not None else 0 for v in values], width, color=colour, alpha=alpha, label=label
            )
        axes.set_xticks(range(len(phases)), [name for name, _, _ in phases])
        axes.set_ylabel("ms (from the gateway's latency histogram)")
        paths.append(save_plot(figure, axes, folder / "latency.png", PLOTS["latency.png"]))
    buckets = ((migration.steps.get("status") or {}).get("figures") or {}).get("diff_buckets") or []
    if buckets:
        figure, axes = plt.subplots(figsize=(9, 4.2))
        labels, counts, previous = [], [], 0.0
        lower = None
        for bound, cumulative in buckets:
            labels.append(f"≤ {bound:g}" if not math.isinf(bound) else f"> {lower:g}")
            counts.append(cumulative - previous)
            previous, lower = cumulative, bound
        axes.bar(range(len(counts)), counts, color="C2", label="compared requests")
        axes.set_xticks(range(len(counts)), labels, rotation=30, fontsize=8)
        axes.set_xlabel("largest absolute difference of the request's outputs")
        axes.set_ylabel("requests")
        paths.append(save_plot(figure, axes, folder / "agreement.png", PLOTS["agreement.png"]))
    return paths


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(head: list[str] | None, rows: list[list[str]]) -> str:
    """A table; with no head, each row's first cell names it."""
    if head is None:
        cells = "".join(
            f"<tr><th>{escape(row[0])}</th>" + "".join(f"<td>{escape(c)}</td>" for c in row[1:]) + "</tr>"
            for row in rows
        )
        return f"<table>{cells}</table>"
    cells = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + f"</tr>{cells}</table>"


def _criteria(c: dict[str, Any]) -> str:
    return (
        f"agreement >= {c['min_agreement']:g}%, errors <= {c['max_errors']}, "
        f"p99 <= {c['max_p99_ratio']:g}x the source's, at least {c['min_requests']} compared"
    )


def _check_html(check: dict[str, Any]) -> str:
    """The check's verdict in a sentence, then its figures, each in words."""
    verdict = "PASS" if check.get("ok") else "FAIL"
    inputs = {"generated": "generated from the signature", "recorded": "recorded traffic"}.get(
        str(check.get("inputs")), str(check.get("inputs"))
    )

    def worst(kind: str) -> str:
        value = check.get(f"worst_{kind}_diff")
        if value is None:
            return "-"
        return f"{value:.3g} (output '{check.get(f'worst_{kind}_output')}', version {check.get(f'worst_{kind}_version')})"

    rows = [
        ["tolerance", f"|new - source| <= atol + rtol * |source|, atol={check.get('atol'):g}, rtol={check.get('rtol'):g}"],
        ["inputs", f"{inputs}, {check.get('cases')} case(s) per version"],
        ["versions", ", ".join(str(v) for v in check.get("versions") or [])],
        ["worst absolute difference", worst("abs")],
        ["worst relative difference", worst("rel")],
    ]  # fmt: skip
    at = f" at {escape(_when(check['at']))}" if check.get("at") else ""
    return f"<p>Verdict: <strong>{verdict}</strong>{at}.</p>" + _table(None, rows)


def render_html(migration: Migration, images: dict[str, bytes]) -> str:
    check = migration.steps.get("check")
    check_html = _check_html(check) if check else "<p>The check has not run.</p>"
    status = migration.steps.get("status")
    if status:
        f = status["figures"]
        agreement = "-" if f.get("agreement") is None else f"{f['agreement'] * 100:.3f}%"
        status_html = (
            f"<p>Verdict: <strong>{escape(status['verdict'])}</strong>"
            + (f" ({escape('; '.join(status['reasons']))})" if status["reasons"] else "")
            + f", at {escape(_when(status['at']))}, counted since the shadow began at "
            f"{escape(_when(status['since']))}.</p>"
            + _table(
                ["requests compared", "agreement", "mismatches", "errors", "max abs diff", "p99 abs diff"],
                [
                    [
                        str(f["compared"]),
                        agreement,
                        str(f["mismatches"]),
                        str(f["errors"]),
                        "-"
                        if f["max_abs_diff"] is None
                        else f"{f['max_abs_diff']:.3g}"
                        + (" (bucket bound)" if f["max_abs_diff_from"] == "histogram" else ""),
                        "-" if f["p99_abs_diff"] is None else f"{f['p99_abs_diff']:.3g}",
                    ]
                ],
            )
            + "<p>Criteria: "
            + escape(_criteria(status["criteria"]))
            + "</p>"
        )
    else:
        status_html = "<p>No shadow verdict yet (`modelyard migrate status`).</p>"
    latency_rows = [
        [
            name,
            side_name,
            str(side["requests"]),
            str(side["errors"]),
            _ms(side["p50_ms"]),
            _ms(side["p99_ms"]),
        ]
        for name, source, new in _phases(migration)
        for side_name, side in ((migration.model, source), (migration.deployment, new))
    ]
    history_rows = [
        [_when(e["at"]), e["step"], e["event"], str(e.get("figure") or e.get("regression") or "")]
        for e in migration.history
    ]
    figures = "".join(
        f'<figure><img alt="{escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(images[name]).decode()}"></figure>'
        for name, title in PLOTS.items()
        if name in images
    )
    split = (migration.steps.get("promote") or {}).get("split", 0)
    title = f"modelyard migrate: {migration.model} → {migration.deployment}"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 100%; }}
.rollbacks {{ color: {"#b00" if migration.rollbacks else "#222"}; }}
</style></head><body>
<h1>{escape(title)}</h1>
<p>From {escape(migration.source_backend or "its backend")} to {escape(migration.to)}; started
{escape(_when(migration.created_at))}. '{escape(migration.deployment)}' answers {split:g}% of
'{escape(migration.model)}' now. <span class="rollbacks">Automatic rollbacks: {migration.rollbacks}.</span></p>
<h2>Check</h2>{check_html}
<h2>Shadow</h2>{status_html}
<h2>Latency, before and after</h2>
<p>Milliseconds from the gateway's own latency histogram: under shadow the source's answers to
clients against the new deployment's runs of the copies; at each promote step both deployments'
answers to clients over the step's window.</p>
{_table(["phase", "deployment", "requests", "errors", "p50 ms", "p99 ms"], latency_rows) if latency_rows else "<p>Nothing measured yet.</p>"}
<h2>Plots</h2>{figures or "<p>Nothing to plot yet.</p>"}
<h2>Step history</h2>
{_table(["at", "step", "event", "figure"], history_rows)}
</body></html>
"""
