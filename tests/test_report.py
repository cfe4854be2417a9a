"""`saebench-poly report`: the page's content from the Parquet files, its self-containment and its escaping (the
browser test, `test_report_browser.py`, checks what a browser renders)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saebench_poly.leaderboard import units_path
from saebench_poly.stored_examples import examples_path
from tests.test_stored_examples import tiny_run

HOSTILE_ENTRY = "<img src=x onerror=alert(1)>"
REPOSITORY = Path(__file__).resolve().parent.parent


def rename_entry(board: Path, old: str, new: str) -> None:
    """Rename an entry in the three tables, as a leaderboard from elsewhere may name it (a report must not trust
    its files' strings)."""
    for path in (board, units_path(board), examples_path(board)):
        table = pq.read_table(path)
        names = [new if name == old else name for name in table.column("entry").to_pylist()]
        table = table.set_column(table.schema.get_field_index("entry"), table.schema.field("entry"), pa.array(names, pa.string()))
        pq.write_table(table, path)


def data_blocks(page: str) -> dict[str, object]:
    return {m.group(1): json.loads(m.group(2)) for m in re.finditer(r'<script type="application/json" id="([^"]+)">(.*?)</script>', page, re.S)}


@pytest.fixture
def hostile_board(tl_spec, text_tl_model_dir, tmp_path: Path) -> Path:
    _, board = tiny_run(tl_spec, tmp_path, model_dir=text_tl_model_dir)
    rename_entry(board, "resid-topk", HOSTILE_ENTRY)
    return board


def test_report_writes_one_self_contained_page_with_everything_escaped(hostile_board: Path, run_cli, tmp_path: Path) -> None:
    output = tmp_path / "page" / "report.html"
    code, out, err = run_cli("report", str(hostile_board), "-o", str(output))
    assert code == 0, err
    assert f"wrote {output}" in out
    page = output.read_text()
    # nothing to fetch: no external script, style sheet, frame or image, and a policy that forbids any
    assert not re.search(r"<(script|link|iframe|img)[^>]+(src|href)=", page)
    assert "default-src 'none'" in page
    # the hostile entry name and token strings appear only as JSON escapes, never as markup
    assert HOSTILE_ENTRY not in page and "<b>t" not in page and "<script>window.__token_ran" not in page
    blocks = data_blocks(page)
    main = blocks["report-data"]
    labels = {e["label"] for e in main["entries"]}
    assert HOSTILE_ENTRY in labels and "neurons:blocks.0.mlp.hook_post" in labels
    hostile = next(e for e in main["entries"] if e["label"] == HOSTILE_ENTRY)
    assert hostile["neurons"] is not None and hostile["values"]["l0"] == pytest.approx(4)
    units = blocks[main["unit_blocks"][hostile["key"]]]
    assert units["width"] == 64 and units["text_kind"] == "text" and units["examples"]
    assert "<script>window.__token_ran = 1</script>" in blocks["vocabulary"]
    # plotly text is HTML-escaped (plotly shows entities as the characters they name)
    figure_text = json.dumps(main["frontiers"])
    assert "&lt;img src=x onerror=alert(1)&gt;" in figure_text and HOSTILE_ENTRY not in figure_text


def test_report_caps_the_units_in_the_page_and_keeps_the_most_polysemantic(hostile_board: Path, run_cli, tmp_path: Path) -> None:
    output = tmp_path / "capped.html"
    code, _, err = run_cli("report", str(hostile_board), "-o", str(output), "--max-units", "10")
    assert code == 0, err
    blocks = data_blocks(output.read_text())
    main = blocks["report-data"]
    hostile = next(e for e in main["entries"] if e["label"] == HOSTILE_ENTRY)
    units = blocks[main["unit_blocks"][hostile["key"]]]
    assert len(units["units"]) == 10 and units["width"] == 64
    assert set(units["most_polysemantic"][:2]) <= set(units["units"])
    assert set(map(int, units["examples"])) <= set(units["units"])


def test_report_of_the_committed_default_leaderboard(run_cli, tmp_path: Path) -> None:
    output = tmp_path / "toy.html"
    code, out, err = run_cli("report", str(REPOSITORY / "leaderboards" / "toy-superposition.parquet"), "-o", str(output))
    assert code == 0, err
    main = data_blocks(output.read_text())["report-data"]
    assert {f["id"] for f in main["frontiers"]} == {"rd", "rdp"}
    assert {e["kind"] for e in main["entries"]} == {"sae", "neurons", "pca", "random"}


def test_report_of_a_missing_file_is_one_line(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("report", str(tmp_path / "nothing.parquet"))
    assert code == 2 and err.startswith("saebench-poly: error: there is no leaderboard at") and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
