"""The HTML report as a reader opens it: a file in headless Chromium, no server. Every image decodes, tables
sort on a click, the provenance footer is there; a screenshot is saved to test-artifacts/."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mosaic_dag.report.markdown import write_report
from tests.support.browser import broken_images, headless_chromium
from tests.support.report_data import curves, planted_codes, planted_runs, results

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_html_report_in_headless_chromium(tmp_path: Path) -> None:
    from mosaic_dag.probes.interpret import interpret_partition

    X, y, frame = planted_codes()
    interp = interpret_partition("gemma.L6.btk tox.en", planted_runs(X, y), lambda _k: X, frame, {0: "fine", 1: "toxic"},
                                 neuronpedia_id="gemma/6-res-16k")
    assert interp is not None
    idx = pd.Index(["en", "fr"], name="train_language")
    transfer = {"gemma.L6.btk tox sae": pd.DataFrame([[0.9, 0.4], [0.5, 0.88]], index=idx, columns=["en", "fr"])}
    rep = write_report(tmp_path / "report", results(), transfer, curves(), baselines={"tox.en": 0.33},
                       provenance={"mosaic.config_hash": "abc123"}, sections_html=interp.html())
    with headless_chromium(tmp_path) as driver:
        from selenium.webdriver.common.by import By

        driver.get(rep.html.as_uri())
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) == len(rep.pngs) + 1  # every figure and the decision tree
        assert broken_images(driver) == []
        table = driver.find_elements(By.CSS_SELECTOR, "table.sortable")[-1]  # all results
        headers = [h.text for h in table.find_elements(By.TAG_NAME, "th")]
        col = headers.index("macro_f1")

        def column() -> list[float]:
            return [float(r.find_elements(By.TAG_NAME, "td")[col].text) for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

        table.find_elements(By.TAG_NAME, "th")[col].click()
        assert column() == sorted(column())
        table.find_elements(By.TAG_NAME, "th")[col].click()
        assert column() == sorted(column(), reverse=True)
        assert "abc123" in driver.find_element(By.TAG_NAME, "footer").text
        assert "latent 3" in driver.find_element(By.TAG_NAME, "body").text  # the interpretation section
        ARTIFACTS.mkdir(exist_ok=True)
        driver.execute_script("window.scrollTo(0, 0)")
        shot = ARTIFACTS / "report-html.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
