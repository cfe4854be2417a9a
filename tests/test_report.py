"""`saebench-poly report`: the page's content from the Parquet files, its self-containment and its escaping, and
the page in a real browser (headless Chromium driven by selenium): the table, the frontier plot and a unit's
examples are rendered, nothing is fetched from anywhere, and markup in names and tokens is shown as text.
`.ci/run` installs Chromium and its driver; where they are absent the browser test is skipped, saying so."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
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


CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")
# Requests that would leave the machine (the browser's own chrome:// pages and the report's file:// do not).
NETWORK_SCHEMES = ("http:", "https:", "ws:", "wss:", "ftp:")


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    found = _chromium()
    if found is None:
        pytest.skip("headless Chromium is not installed (apt-get install -y chromium chromium-driver; .ci/run does it)")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="saebench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requested_urls(driver) -> list[str]:
    urls = []
    for record in driver.get_log("performance"):
        message = json.loads(record["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            urls.append(message["params"].get("request", {}).get("url") or message["params"].get("url", ""))
    return urls


def test_the_report_renders_offline_and_shows_markup_as_text(browser, hostile_board: Path, run_cli, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    output = tmp_path / "report.html"
    code, _, err = run_cli("report", str(hostile_board), "-o", str(output))
    assert code == 0, err
    browser.get(output.as_uri())
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-rendered") == "true")

    # the sortable table: one row per entry, reference entries marked, a click on a heading sorts
    rows = browser.find_elements(By.CSS_SELECTOR, "#leaderboard-table tbody tr")
    assert len(rows) == 5
    names = [row.find_element(By.CSS_SELECTOR, "td").text for row in rows]
    assert any(name == HOSTILE_ENTRY for name in names)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#leaderboard-table tr.reference")) == 4
    heading = next(th for th in browser.find_elements(By.CSS_SELECTOR, "#leaderboard-table th") if th.text == "l0")
    heading.click()
    l0_column = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#leaderboard-table th")].index("l0")
    values = [float(row.find_elements(By.CSS_SELECTOR, "td")[l0_column].text)
              for row in browser.find_elements(By.CSS_SELECTOR, "#leaderboard-table tbody tr")]
    assert values == sorted(values)

    # the frontier plot: plotly drew its points and labelled them with the entry names, as text
    # (one plot per model, hook and spec: the residual stream's four entries, the MLP neurons' one)
    plots = browser.find_elements(By.CSS_SELECTOR, ".frontier-plot[id^='frontier-rd-']")
    assert sum(len(p.find_elements(By.CSS_SELECTOR, ".scatterlayer .point")) for p in plots) == 5
    labels = [t.get_attribute("textContent") for t in plots[0].find_elements(By.CSS_SELECTOR, ".scatterlayer .textpoint text")]
    assert HOSTILE_ENTRY in labels

    # the unit explorer: the hostile entry's most polysemantic unit, with its behaviours' examples as text
    select = Select(browser.find_element(By.ID, "explorer-entry"))
    select.select_by_visible_text(HOSTILE_ENTRY)
    browser.find_element(By.ID, "explorer-most").click()
    examples = browser.find_elements(By.CSS_SELECTOR, "#unit-behaviours .behaviour:not([hidden]) .example")
    assert examples and browser.find_elements(By.CSS_SELECTOR, "#unit-metrics-table tr")
    for example in examples:
        assert len(example.find_elements(By.CSS_SELECTOR, ".token.peak")) == 1
    tokens = [t.get_attribute("textContent") for t in browser.find_elements(By.CSS_SELECTOR, "#unit-behaviours .token")]
    assert tokens and all(t.startswith(("<b>t", "<script>", "<bos>")) for t in tokens)
    assert not browser.find_elements(By.CSS_SELECTOR, "#unit-behaviours b, #unit-behaviours script")
    browser.find_element(By.ID, "explorer-random").click()
    assert browser.find_element(By.ID, "explorer-unit").get_attribute("value").isdigit()

    # nothing ran: no alert, no injected script, no image element; and nothing was requested from anywhere
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text  # noqa: B018 - the attribute access is the check
    assert browser.execute_script("return window.__token_ran === undefined && document.images.length === 0")
    urls = requested_urls(browser)
    assert output.as_uri() in urls and not [url for url in urls if url.startswith(NETWORK_SCHEMES)]
