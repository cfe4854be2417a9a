"""The HTML report of a leaderboard: one self-contained file (no network needed to open it) made from the Parquet
files alone: the leaderboard (`<name>.parquet`), its per-unit table (`<name>.units.parquet`) and, when present, the
stored examples (`<name>.examples.parquet`).

`saebench_poly.report.content` turns the tables into what the page shows (the figures are plotly figures built in
`saebench_poly.report.figures`), `saebench_poly.report.page` writes the page. Everything a user wrote (entry names,
spec names, token strings) reaches the page only as JSON data that the page's script puts into text nodes, and as
HTML-escaped plotly text, so none of it is ever read as markup.
"""

from saebench_poly.report.page import DEFAULT_MAX_UNITS, ReportSummary, build_report, default_report_path

__all__ = ["DEFAULT_MAX_UNITS", "ReportSummary", "build_report", "default_report_path"]
