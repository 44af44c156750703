"""The report folder of `modelyard bench`: results.json, results.csv, three PNG plots, and
report.html with everything inline (the plots as base64 images), so it opens offline."""

from __future__ import annotations

import base64
import csv
import dataclasses
import math
from html import escape
from pathlib import Path
from typing import Any

import orjson

from gateway.tools.errors import ToolError
from gateway.tools.lab.bench import BenchResult, Scenario, format_table

PLOTS = {
    "latency_cdf.png": "Latency CDF per deployment",
    "throughput_vs_concurrency.png": "Throughput vs concurrency",
    "p99_vs_throughput.png": "p99 latency vs throughput",
}
CSV_FIELDS = [f.name for f in dataclasses.fields(Scenario) if f.name != "latency_quantiles_ms"]


class ReportError(ToolError):
    """The report cannot be written as asked (matplotlib missing, folder not writable)."""


MISSING_MATPLOTLIB = (
    "the report's plots need matplotlib, which is not installed where modelyard runs: install the 'lab' "
    "extra with that environment's pip (in a checkout: .venv/bin/python -m pip install -e '.[lab]'; "
    "elsewhere: python -m pip install 'modelyard[lab]')"
)


def require_plotting() -> None:
    """Fails before anything is measured when the plots could not be drawn afterwards."""
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError as exc:
        raise ReportError(MISSING_MATPLOTLIB) from exc


def write_report(result: BenchResult, folder: Path) -> list[Path]:
    """Every file of the report, written into `folder` (made if needed). The measurements
    (results.json, results.csv) are written first, so they survive a failure to plot."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [_write_json(result, folder / "results.json"), _write_csv(result, folder / "results.csv")]
    try:
        require_plotting()
    except ReportError as exc:
        raise ReportError(f"{exc}; the measurements are in {written[0]} and {written[1]}") from exc
    plots = _plot(result, folder)
    written += plots
    html = folder / "report.html"
    html.write_text(render_html(result, {p.name: p.read_bytes() for p in plots}))
    return [html, *written]


def as_json(result: BenchResult) -> dict[str, Any]:
    plan = dataclasses.asdict(result.plan)
    plan["inputs"] = str(plan["inputs"]) if plan["inputs"] else None
    return {
        "plan": plan,
        "url": result.url,
        "machine": result.machine,
        "generator_ceiling": dataclasses.asdict(result.ceiling),
        "generator_ceiling_runs": [dataclasses.asdict(s) for s in result.ceiling_runs],
        "scenarios": [dataclasses.asdict(s) for s in result.scenarios],
        "parity": [dataclasses.asdict(p) for p in result.parity],
        "verdicts": result.verdicts,
    }


def _write_json(result: BenchResult, path: Path) -> Path:
    # orjson writes the NaN percentiles of a scenario without one answer as null.
    path.write_bytes(orjson.dumps(as_json(result), option=orjson.OPT_INDENT_2))
    return path


def _write_csv(result: BenchResult, path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for scenario in [*result.scenarios, result.ceiling]:
            writer.writerow(dataclasses.asdict(scenario))
    return path


def _deployments(result: BenchResult) -> list[str]:
    return list(dict.fromkeys(s.deployment for s in result.scenarios))


# The no-op ceiling is drawn on the throughput plot when it is at most this many times the fastest row.
CEILING_IN_VIEW = 1.5


def _plot(result: BenchResult, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    deployments = _deployments(result)
    colors = {d: f"C{i}" for i, d in enumerate(deployments)}
    styles = ["-", "--", ":", "-."]
    paths = []

    figure, axes = plt.subplots(figsize=(9, 4.2))
    for s in result.scenarios:
        if not s.latency_quantiles_ms:
            continue
        points = len(s.latency_quantiles_ms)
        style = styles[result.plan.concurrency.index(s.concurrency) % len(styles)]
        axes.plot(
            s.latency_quantiles_ms,
            [i / (points - 1) for i in range(points)],
            style,
            color=colors[s.deployment],
            label=f"{s.deployment} b={s.batch} c={s.concurrency}",
        )
    axes.set_xscale("log")
    axes.set_xlabel("latency (ms, log scale)")
    axes.set_ylabel("share of requests")
    paths.append(save_plot(figure, axes, folder / "latency_cdf.png", "Latency CDF per deployment"))

    figure, axes = plt.subplots(figsize=(9, 4.2))
    highest = 0.0
    for deployment in deployments:
        for batch in result.plan.batch:
            rows = [s for s in result.scenarios if s.deployment == deployment and s.batch == batch]
            highest = max([highest, *(s.req_per_s for s in rows)])
            axes.plot(
                [s.concurrency for s in rows],
                [s.req_per_s for s in rows],
                "o-",
                color=colors[deployment],
                alpha=1.0 if batch == result.plan.batch[0] else 0.5,
                label=f"{deployment} b={batch}",
            )
    ceiling = result.ceiling.req_per_s
    if 0 < ceiling <= CEILING_IN_VIEW * highest:
        axes.axhline(ceiling, color="grey", linestyle="--", label=f"generator ceiling (no-op), {ceiling:.0f}")
    elif ceiling > 0:
        # Drawn, a far-off ceiling would squeeze the deployments into the bottom of the plot.
        axes.plot([], [], " ", label=f"generator ceiling (no-op): {ceiling:.0f}, above the plot")
    axes.set_ylim(bottom=0)
    axes.set_xscale("log", base=2)
    axes.set_xticks(result.plan.concurrency, [str(c) for c in result.plan.concurrency])
    axes.set_xlabel("concurrency (clients)")
    axes.set_ylabel("requests per second")
    paths.append(
        save_plot(figure, axes, folder / "throughput_vs_concurrency.png", "Throughput vs concurrency")
    )

    figure, axes = plt.subplots(figsize=(9, 4.2))
    for deployment in deployments:
        for batch in result.plan.batch:
            rows = [
                s
                for s in result.scenarios
                if s.deployment == deployment and s.batch == batch and not math.isnan(s.p99_ms)
            ]
            axes.plot(
                [s.req_per_s for s in rows],
                [s.p99_ms for s in rows],
                "o-",
                color=colors[deployment],
                alpha=1.0 if batch == result.plan.batch[0] else 0.5,
                label=f"{deployment} b={batch}",
            )
            for s in rows:
                axes.annotate(
                    f"c={s.concurrency}",
                    (s.req_per_s, s.p99_ms),
                    xytext=(5, 5),
                    textcoords="offset points",
                    fontsize=7,
                    color=colors[deployment],
                )
    axes.set_yscale("log")
    # Ticks at 1, 2 and 5 of each decade, written as plain numbers: a p99 range inside one or two
    # decades still gets a readable axis.
    axes.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("requests per second")
    axes.set_ylabel("p99 latency (ms, log scale)")
    paths.append(save_plot(figure, axes, folder / "p99_vs_throughput.png", "p99 latency vs throughput"))
    return paths


def save_plot(figure: Any, axes: Any, path: Path, title: str) -> Path:
    """The house style of a report's plot (title, grid, legend beside it), saved and closed."""
    import matplotlib.pyplot as plt

    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    # Beside the plot, never over its curves.
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def markdown_table(result: BenchResult) -> str:
    rows = format_table(result)
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


# The gateway's phases in the order a request goes through them (gateway/timing.py).
PHASE_ORDER = ("decode", "load", "queue", "batch", "backend", "encode")


def phase_table(result: BenchResult) -> str:
    """Where each row's time went inside the gateway, from its phase histograms; nothing where the
    gateway exports none."""
    seen = {phase for s in result.scenarios for phase in s.phases_ms}
    if not seen:
        return ""
    phases = [p for p in PHASE_ORDER if p in seen] + sorted(seen - set(PHASE_ORDER))
    head = "".join(f"<th>{escape(p)}</th>" for p in ("deployment", "batch", "c", *phases))
    body = "".join(
        f"<tr><td>{escape(s.deployment)}</td><td>{s.batch}</td><td>{s.concurrency}</td>"
        + "".join(f"<td>{s.phases_ms[p]:.3f}</td>" if p in s.phases_ms else "<td>-</td>" for p in phases)
        + "</tr>"
        for s in result.scenarios
    )
    return (
        "<h3>Where the gateway's time went</h3><p>Mean milliseconds per request in each phase, from the "
        "gateway's <code>modelyard_request_phase_seconds</code> over the row (its warm-up included): "
        "decode and encode in the front door, queue for the model's limits, batch for a batch to fill, "
        "backend for the adapter's call (a load waited for, where one was, is load). The client's latency "
        "adds the network, the server's HTTP or gRPC stack and the client's own work.</p>"
        f"<table><tr>{head}</tr>{body}</table>"
    )


def render_html(result: BenchResult, images: dict[str, bytes]) -> str:
    plan = result.plan
    table = format_table(result)
    head = "".join(f"<th>{escape(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    parity_rows = "".join(
        f"<tr><td>{escape(p.deployment)}</td><td>{escape(p.reference)}</td><td>{escape(p.output)}</td>"
        f"<td>{p.max_abs:.3e}</td><td>{p.max_rel:.3e}</td><td>{'yes' if p.within else 'NO'}</td></tr>"
        for p in result.parity
    )
    machine = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in result.machine.items())
    figures = "".join(
        f'<figure><img alt="{escape(title)}" src="data:image/png;base64,'
        f'{base64.b64encode(images[name]).decode()}"><figcaption>{escape(title)}</figcaption></figure>'
        for name, title in PLOTS.items()
        if name in images
    )
    errors = "".join(
        f"<li>{escape(s.deployment)} b={s.batch} c={s.concurrency}: {escape(s.first_error)}</li>"
        for s in [*result.scenarios, result.ceiling]
        if s.first_error
    )
    # The bottom line first, in bold; then one line per verdict.
    verdicts = "".join(
        f"<li><strong>{escape(v)}</strong></li>" if i == 0 else f"<li>{escape(v)}</li>"
        for i, v in enumerate(result.verdicts)
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelyard bench: {escape(plan.model)}</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; }}
th {{ background: #f3f3f3; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>modelyard bench: {escape(plan.model)}</h1>
<h2>Verdicts</h2><ul>{verdicts}</ul>
<h2>How it was measured</h2>
<p>{len(_deployments(result))} deployments over {escape(plan.protocol)} through the gateway at
{escape(result.url)}; {plan.duration_s:g} s measured per row after {plan.warmup_s:g} s warm-up; each client
sends one request at a time (closed loop). Latency is measured by the client, from send to parsed
answer. Every 10th answer is checked against the first deployment's answer for the same input
(rtol 1e-4, atol 1e-5); a wrong answer counts as an error. RSS is the resident memory of the process
that served the deployment, read from the gateway's /status after its rows: the gateway itself
for in-process backends (shared by all of them), the managed TorchServe with its workers.</p>
<h2>Results</h2><table><tr>{head}</tr>{body}</table>
{phase_table(result)}
{f"<h3>First error per row</h3><ul>{errors}</ul>" if errors else ""}
<h2>Plots</h2>{figures}
<h2>Parity</h2>
<p>The outputs of each deployment for the same {escape(str(plan.batch[0]))}-row inputs, against the first
deployment's (tolerance: rtol 1e-4, atol 1e-5).</p>
<table><tr><th>deployment</th><th>reference</th><th>output</th><th>max abs diff</th><th>max rel diff</th><th>within</th></tr>
{parity_rows or '<tr><td colspan="6">one deployment only: nothing to compare</td></tr>'}</table>
<h2>Machine</h2><table>{machine}</table>
</body></html>
"""
