"""Writing the report page: one HTML file with plotly.js, the page's script and style, and the data inlined.

The data goes in ``<script type="application/json">`` blocks with every ``<``, ``>`` and ``&`` written as a JSON
escape, so no string in it can close the block or be read as markup; the page's script reads it with
``JSON.parse`` and writes it into text nodes only (never ``innerHTML``). Each entry's per-unit data has its own
block, parsed only when the explorer opens that entry.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from importlib.metadata import version
from pathlib import Path
from typing import Any

from saebench_poly.leaderboard import write_atomic
from saebench_poly.report.content import ReportContent, read_content
from saebench_poly.report.figures import distribution_figure, frontier_figures, shares_figure

# At most this many units of an entry get their per-unit values and examples into the page (module docstring of
# saebench_poly.report.content says which).
DEFAULT_MAX_UNITS = 500


@dataclass
class ReportSummary:
    output: Path
    bytes: int
    seconds: float
    entries: int
    units_shown: int
    has_examples: bool


def default_report_path(leaderboard: Path) -> Path:
    """``leaderboards/<name>.parquet`` -> ``leaderboards/<name>.html``."""
    return leaderboard.with_name(leaderboard.name.removesuffix(".parquet") + ".html")


def _json_block(element_id: str, data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _asset(name: str) -> str:
    return resources.files("saebench_poly.report").joinpath("assets", name).read_text(encoding="utf-8")


def render(content: ReportContent) -> str:
    """The page's HTML."""
    from plotly.offline import get_plotlyjs

    labels = {e["key"]: e["label"] for e in content.entries}
    distributions = {e["key"]: distribution_figure(e, content.units[e["key"]]["histogram"], labels)
                     for e in content.entries if content.units.get(e["key"], {}).get("histogram")}
    main = {
        "source": content.source, "generated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "version": version("saebench-poly"), "entries": content.entries, "metrics": content.metrics,
        "specs": content.specs, "frontiers": frontier_figures(content.entries), "shares": shares_figure(content.entries),
        "distributions": distributions, "has_examples": content.has_examples,
        "unit_blocks": {key: f"units-{i}" for i, key in enumerate(content.units)},
    }
    blocks = [_json_block("report-data", main), _json_block("vocabulary", content.vocabulary)]
    blocks += [_json_block(f"units-{i}", data) for i, data in enumerate(content.units.values())]
    title = html.escape(f"saebench-poly report: {content.source}")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        # Nothing may be fetched: the page runs its inline scripts and nothing from elsewhere.
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline' "
        "'unsafe-eval'; style-src 'unsafe-inline'; img-src data: blob:; font-src data:\">",
        f"<title>{title}</title>", f"<style>{_asset('report.css')}</style>", "</head><body>",
        _asset("report.html"), *blocks,
        f"<script>{get_plotlyjs()}</script>", f"<script>{_asset('report.js')}</script>", "</body></html>",
    ])


def build_report(leaderboard: Path, output: Path | None = None, max_units: int = DEFAULT_MAX_UNITS) -> ReportSummary:
    """Write the report of ``leaderboard`` to ``output`` (default `default_report_path`), atomically."""
    started = time.perf_counter()
    content = read_content(leaderboard, max_units)
    text = render(content).encode("utf-8")
    output = output or default_report_path(leaderboard)
    write_atomic(text, output)
    return ReportSummary(output=output, bytes=len(text), seconds=time.perf_counter() - started,
                         entries=len(content.entries), units_shown=sum(len(u["units"]) for u in content.units.values()),
                         has_examples=content.has_examples)
