"""Headless Chromium for the browser tests (Debian `chromium` + `chromium-driver`, see .ci/services.sh)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.path.isfile(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


@contextlib.contextmanager
def headless_chromium(log_dir: Path, size: str = "1600,1000") -> Iterator[Any]:
    """A selenium driver on headless Chromium; skips the test with the fix when Chromium is not installed."""
    chromium = find("chromium", "chromium-browser", "google-chrome")
    driver_bin = find("chromedriver", "/usr/lib/chromium/chromedriver")
    if not chromium or not driver_bin:
        pytest.skip("chromium / chromedriver not installed; run .ci/services.sh (Debian: chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed; pip install selenium")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mosaic-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--no-proxy-server", f"--window-size={size}", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin, log_output=str(log_dir / "chromedriver.log")),
                              options=opts)
    try:
        driver.set_page_load_timeout(90)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def broken_images(driver: Any) -> list[str]:
    """Alt texts of every <img> on the page that did not decode (natural width 0)."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));")
