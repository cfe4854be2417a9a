"""The report's plotly figures, as plain figure dicts (``{"data": [...], "layout": {...}}``) that the page draws
with the plotly.js it inlines. Every string from the data is HTML-escaped: plotly reads a few tags in its text
(``<b>``, ``<br>``) and shows entities as the characters they name, so an escaped name is shown as written.
"""

from __future__ import annotations

import html
from typing import Any

from saebench_poly.frontier import DISTORTION_METRIC, GROUP_COLUMNS, POLYSEMANTICITY_METRIC, RATE_METRIC

KIND_COLOURS = {"sae": "#1f77b4", "neurons": "#d62728", "pca": "#7f7f7f", "random": "#9467bd"}
OTHER_COLOUR = "#2ca02c"
DOWNSTREAM_METRIC = "ce_increase"
_LAYOUT = {"margin": {"l": 60, "r": 20, "t": 50, "b": 50}, "height": 420, "hovermode": "closest",
           "legend": {"orientation": "h", "y": -0.2}, "template": None, "plot_bgcolor": "#fafafa"}


def escaped(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _groups(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Entries by frontier group (model, hook, spec hash), as `saebench_poly.frontier` compares them."""
    groups: dict[tuple, list] = {}
    for entry in entries:
        groups.setdefault(tuple(entry[column] for column in GROUP_COLUMNS), []).append(entry)
    return list(groups.values())


def _title(group: list[dict[str, Any]], what: str) -> str:
    first = group[0]
    return escaped(f"{what}: {first['spec_name']} · {first['model_id']} · {first['hook']}")


def _scatter(group: list[dict[str, Any]], x: str, y: str, flag: str, colour_by: str | None = None) -> list[dict[str, Any]]:
    """One trace per entry kind (or one coloured by ``colour_by``), entries labelled, and the Pareto entries of
    ``flag`` as outlined stars joined by the frontier's staircase."""
    points = [e for e in group if e["values"].get(x) is not None and e["values"].get(y) is not None]
    if colour_by is not None:
        points = [e for e in points if e["values"].get(colour_by) is not None]
    traces = []
    kinds = [None] if colour_by is not None else list(dict.fromkeys(e["kind"] for e in points))
    for kind in kinds:
        members = points if kind is None else [e for e in points if e["kind"] == kind]
        marker: dict[str, Any] = {
            "size": [16 if e["pareto"].get(flag) else 10 for e in members],
            "symbol": ["star" if e["pareto"].get(flag) else "circle" for e in members],
            "line": {"width": [2 if e["pareto"].get(flag) else 0 for e in members], "color": "#000"},
        }
        if colour_by is None:
            marker["color"] = KIND_COLOURS.get(kind, OTHER_COLOUR)
        else:
            marker.update(color=[e["values"][colour_by] for e in members], colorscale="Viridis", showscale=True,
                          colorbar={"title": {"text": escaped(colour_by.replace("_", " "))}})
        traces.append({
            "type": "scatter", "mode": "markers+text", "name": escaped(kind or "entries"),
            "x": [e["values"][x] for e in members], "y": [e["values"][y] for e in members],
            "text": [escaped(e["label"]) for e in members], "textposition": "top center",
            "customdata": [[escaped(e["label"]), escaped(e["kind"]), "yes" if e["pareto"].get(flag) else "no"]
                           + ([e["values"][colour_by]] if colour_by else []) for e in members],
            "hovertemplate": (f"%{{customdata[0]}} (%{{customdata[1]}})<br>{escaped(x)} = %{{x:.4g}}<br>{escaped(y)} = %{{y:.4g}}"
                              + (f"<br>{escaped(colour_by)} = %{{customdata[3]:.4g}}" if colour_by else "")
                              + "<br>Pareto: %{customdata[2]}<extra></extra>"),
            "marker": marker,
        })
    optimal = sorted((e for e in points if e["pareto"].get(flag)), key=lambda e: (e["values"][x], e["values"][y]))
    if len(optimal) > 1:
        traces.append({"type": "scatter", "mode": "lines", "name": "Pareto frontier", "hoverinfo": "skip",
                       "line": {"shape": "hv", "dash": "dot", "color": "#000", "width": 1},
                       "x": [e["values"][x] for e in optimal], "y": [e["values"][y] for e in optimal]})
    return traces


def _figure(traces: list[dict[str, Any]], title: str, x: str, y: str) -> dict[str, Any]:
    return {"data": traces, "layout": {**_LAYOUT, "title": {"text": title},
                                       "xaxis": {"title": {"text": escaped(x)}, "zeroline": False},
                                       "yaxis": {"title": {"text": escaped(y)}, "zeroline": False}}}


def frontier_figures(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per frontier group: rate vs FVU, rate vs downstream CE increase where the group has it, and the 3-way view
    (rate vs FVU coloured by mean effective behaviours, 3-way Pareto entries as stars)."""
    figures = []
    for group in _groups(entries):
        traces = _scatter(group, RATE_METRIC, DISTORTION_METRIC, "pareto_rate_distortion")
        if not traces:
            continue
        figures.append({"id": "rd", "figure": _figure(traces, _title(group, "rate-distortion"), RATE_METRIC, DISTORTION_METRIC)})
        if any(e["values"].get(DOWNSTREAM_METRIC) is not None for e in group):
            traces = _scatter(group, RATE_METRIC, DOWNSTREAM_METRIC, "pareto_rate_distortion")
            figures.append({"id": "rce", "figure": _figure(traces, _title(group, "rate vs downstream CE increase"),
                                                           RATE_METRIC, DOWNSTREAM_METRIC)})
        if any(e["values"].get(POLYSEMANTICITY_METRIC) is not None for e in group):
            traces = _scatter(group, RATE_METRIC, DISTORTION_METRIC, "pareto_rate_distortion_polysemanticity",
                              colour_by=POLYSEMANTICITY_METRIC)
            figures.append({"id": "rdp", "figure": _figure(traces, _title(group, "rate-distortion-polysemanticity"),
                                                           RATE_METRIC, DISTORTION_METRIC)})
    return figures


def shares_figure(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per entry, the shares of dead units, of units with too few examples, and of monosemantic units."""
    metrics = ["dead_fraction", "too_few_examples_fraction", "monosemantic_fraction"]
    shown = [e for e in entries if any(e["values"].get(m) is not None for m in metrics)]
    if not shown:
        return None
    traces = [{"type": "bar", "name": escaped(metric.replace("_", " ")), "x": [escaped(e["label"]) for e in shown],
               "y": [e["values"].get(metric) for e in shown], "hovertemplate": "%{x}: %{y:.3g}<extra></extra>"}
              for metric in metrics if any(e["values"].get(metric) is not None for e in shown)]
    return {"data": traces, "layout": {**_LAYOUT, "barmode": "group", "title": {"text": "dead and too-few-examples shares"},
                                       "yaxis": {"title": {"text": "share of units"}, "range": [0, 1.02]}}}


def distribution_figure(entry: dict[str, Any], histogram: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """The entry's distribution of effective behaviours against its comparison neurons', on shared bins."""
    edges = histogram["edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    widths = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    traces = []
    for series, colour in zip(histogram["series"], ("#1f77b4", "#d62728"), strict=False):
        name = f"{labels[series['key']]} ({series['units']} units)"
        traces.append({"type": "bar", "name": escaped(name), "x": centres, "y": series["share"], "width": widths,
                       "opacity": 0.6, "marker": {"color": colour},
                       "hovertemplate": "exp(H) ≈ %{x:.3g}: %{y:.3g} of units<extra></extra>"})
    return {"data": traces, "layout": {**_LAYOUT, "barmode": "overlay",
                                       "title": {"text": escaped(f"effective behaviours per unit: {entry['label']}")},
                                       "xaxis": {"title": {"text": "effective behaviours exp(H) (units with enough examples)"}},
                                       "yaxis": {"title": {"text": "share of units"}}}}
