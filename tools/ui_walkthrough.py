"""Run a config through the Dagster UI the way a user does, and record what the UI shows.

    python tools/ui_walkthrough.py --config mosaic_dag/configs/demo.yaml --out test-artifacts/ui

Starts `mosaic ui` (dagster dev, automation on) on a fresh instance, waits for the config's partitions
to be registered by the sensor, clicks "Materialize…" on the `dataset` asset in headless Chromium
and launches it, then leaves the rest to declarative automation. It waits until every partition of
every asset is materialized (or a run fails), checks that nothing is stale, and saves screenshots of
the asset graph. A developer check, not part of `make test`: it runs the whole experiment.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]

STATUS_QUERY = """
{ assetNodes { assetKey { path } isPartitioned
    partitionStats { numMaterialized numPartitions numFailed numMaterializing }
    assetMaterializations(limit: 1) { runId }
    staleStatus } }
"""
RUNS_QUERY = """
{ runsOrError(limit: 500) { ... on Runs { results { runId status jobName tags { key value } } } } }
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gql(url: str, query: str) -> dict:
    r = requests.post(f"{url}/graphql", json={"query": query}, timeout=60)
    r.raise_for_status()
    body = r.json()
    if body.get("errors"):
        raise RuntimeError(body["errors"])
    return body["data"]


def _browser(profile: str):  # type: ignore[no-untyped-def]
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--no-proxy-server", "--window-size=1600,1000", f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    driver_bin = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    return webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)


def _click(driver, label: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    from selenium.common.exceptions import ElementClickInterceptedException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
            with contextlib.suppress(Exception):
                skip.click()
        try:  # the page re-renders while it loads: a button found a moment ago may be gone
            found = [b for b in driver.find_elements(By.XPATH, f"//button[starts-with(normalize-space(), '{label}')]")
                     if b.is_enabled() and b.get_attribute("disabled") is None]
            if found:  # the dialog's button may sit below the fold: scroll to it, then click as a user would
                driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found[-1])
                time.sleep(0.5)
                try:
                    found[-1].click()
                except ElementClickInterceptedException:  # an overlay's edge: a JS click is the same event
                    driver.execute_script("arguments[0].click();", found[-1])
                return
        except StaleElementReferenceException:
            pass
        time.sleep(1)
    labels = sorted({b.text.strip() for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip()})
    raise RuntimeError(f"no enabled button '{label}…' on {driver.current_url}; buttons: {labels}")


def _stop_on_term(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")  # so the UI is shut down on the way out


def main() -> int:
    signal.signal(signal.SIGTERM, _stop_on_term)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", default=str(ROOT / "test-artifacts" / "ui"))
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    home = Path(tempfile.mkdtemp(prefix="mosaic-ui-home-"))
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MOSAIC_AUTOMATION", "MLFLOW_TRACKING_URI")}
    env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    port = _port()
    url = f"http://127.0.0.1:{port}"
    log = out / "dagster-dev.log"
    started = time.monotonic()
    with log.open("wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "ui", "--config", args.config, "--port", str(port)],
                                cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    profile = tempfile.mkdtemp(prefix="mosaic-ui-chromium-")
    driver = None
    try:
        def wait(what: str, check, timeout: float):  # type: ignore[no-untyped-def]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{what}: dagster dev exited; see {log}")
                with contextlib.suppress(Exception):
                    if (value := check()):
                        return value
                time.sleep(2)
            raise RuntimeError(f"{what}: not within {timeout:.0f} s")

        def nodes() -> list[dict]:
            return _gql(url, STATUS_QUERY)["assetNodes"]

        wait("partitions registered by config_partitions_sensor",
             lambda: all((n["partitionStats"] or {}).get("numPartitions", 0) > 0 for n in nodes() if n["isPartitioned"]), 300)
        print(f"[{time.monotonic() - started:6.0f}s] UI up, partitions registered")
        driver = _browser(profile)
        driver.set_page_load_timeout(120)
        driver.get(f"{url}/assets/dataset")
        _click(driver, "Materialize")  # "Materialize…" on a partitioned asset: opens the partition dialog
        time.sleep(2)
        _click(driver, "All")  # the dialog opens with no partition selected: select every partition
        time.sleep(1)
        driver.save_screenshot(str(out / "1-materialize-dialog.png"))
        _click(driver, "Launch backfill")
        print(f"[{time.monotonic() - started:6.0f}s] clicked Materialize… → Launch on dataset (all partitions)")
        time.sleep(3)
        driver.save_screenshot(str(out / "2-launched.png"))

        def done() -> list[dict] | None:
            ns = nodes()
            runs = _gql(url, RUNS_QUERY)["runsOrError"]["results"]
            failed = [r for r in runs if r["status"] == "FAILURE"]
            if failed:
                raise SystemExit(f"run {failed[0]['runId']} ({failed[0]['jobName']}) failed; see the UI / {log}")
            complete = all((n["partitionStats"]["numMaterialized"] == n["partitionStats"]["numPartitions"])
                           if n["isPartitioned"] else bool(n["assetMaterializations"]) for n in ns)
            busy = any(r["status"] in ("QUEUED", "STARTING", "STARTED", "NOT_STARTED") for r in runs)
            return ns if complete and not busy else None

        ns = wait("every asset partition materialized by automation", done, args.timeout)
        runs = _gql(url, RUNS_QUERY)["runsOrError"]["results"]
        by_automation = sum(1 for r in runs if any(t["key"] == "dagster/from_automation_condition" for t in r["tags"]))
        summary = {
            "config": args.config, "seconds": round(time.monotonic() - started),
            "runs": len(runs), "runs_requested_by_automation": by_automation,
            "assets": {"/".join(n["assetKey"]["path"]): {"stale": n["staleStatus"], **(n["partitionStats"] or {})} for n in ns},
        }
        print(json.dumps(summary, indent=1))
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        driver.get(f"{url}/asset-groups")
        time.sleep(8)
        from selenium.webdriver.common.by import By

        for _ in range(3):  # Dagster's first-visit community dialog would cover the graph
            for skip in driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):
                with contextlib.suppress(Exception):
                    skip.click()
            time.sleep(1)
        driver.save_screenshot(str(out / "3-asset-graph-materialized.png"))
        stale = [k for k, v in summary["assets"].items() if v["stale"] not in ("FRESH", None)]
        print("stale:", stale or "none")
        return 1 if stale else 0
    finally:
        if driver is not None:
            driver.quit()
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):  # dagster dev, its daemon and servers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=wait_s)
                break
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
