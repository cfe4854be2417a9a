"""The README's screenshot of the report (docs/report.png): the unit explorer of the default benchmark's report on
the most polysemantic latent of l1-0.1, taken with headless Chromium.

    saebench-poly report leaderboards/toy-superposition.parquet && python scripts/report_screenshot.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from tests.test_report import CHROMIUM_FLAGS  # noqa: E402


def main() -> None:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*(f for f in CHROMIUM_FLAGS if not f.startswith("--window-size")), "--window-size=1200,1500",
                 f"--user-data-dir={tempfile.mkdtemp()}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        driver.get((REPOSITORY / "leaderboards" / "toy-superposition.html").as_uri())
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-rendered") == "true")
        Select(driver.find_element(By.ID, "explorer-entry")).select_by_visible_text("l1-0.1")
        driver.find_element(By.ID, "explorer-most").click()
        driver.execute_script("document.getElementById('explorer').scrollIntoView()")
        time.sleep(1)  # let the layout settle before the element's picture is taken
        driver.find_element(By.ID, "explorer").screenshot(str(REPOSITORY / "docs" / "report.png"))
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
