"""Real services, end to end, on 127.0.0.1 only: `dagster dev` (webserver + daemon) driven through its
GraphQL API, the asset-graph page in headless Chromium, and `mlflow server` over the store the runs wrote.

Every process is started in its own session and its whole process group is stopped in teardown,
also when a test fails. Chromium/chromedriver come from Debian (`.ci/services.sh`); where they are
missing the browser test skips with a message, the rest still runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import yaml

from tests.support.models import fast_config
from tests.support.runs import free_port

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
TARGET, DATASET = "tiny.L0.s16", "toy.en"
STARTUP_S = 180
RUN_S = 240

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module", autouse=True)
def _loopback_without_proxy() -> Iterator[None]:
    """Talk to 127.0.0.1 directly even where CI sets HTTP(S)_PROXY."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("NO_PROXY", "no_proxy"):
            mp.setenv(var, ",".join(filter(None, [os.environ.get(var, ""), "127.0.0.1", "localhost"])))
        yield


# --------------------------------------------------------------------------------------------- process helpers


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, grace: float = 30) -> None:
    """Ask the process group to stop, then kill whatever is left of it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived the leader
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def service(cmd: list[str], log: Path, env: dict[str, str], cwd: Path, stop_signal: int) -> Iterator[subprocess.Popen]:
    with log.open("wb") as fh:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            yield proc
        finally:
            stop_group(proc, stop_signal)


def log_tail(log: Path, n: int = 4000) -> str:
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def wait_until(what: str, check, timeout: float, proc: subprocess.Popen, log: Path, every: float = 1.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited (rc={proc.returncode})\n{log_tail(log)}")
        try:
            result = check()
            if result:
                return result
        except Exception as err:  # noqa: BLE001 - not up yet
            last = err
        time.sleep(every)
    pytest.fail(f"{what}: not ready after {timeout:.0f} s (last error: {last})\n{log_tail(log)}")


def service_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MOSAIC_CONFIG", "MLFLOW_TRACKING_URI", "DAGSTER_HOME")}
    env.update({"PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


# --------------------------------------------------------------------------------------------- dagster dev

LINEAGE_QUERY = """
query Lineage($key: AssetKeyInput!) {
  assetNodeOrError(assetKey: $key) {
    __typename
    ... on AssetNode {
      dependencyKeys { path }
      dependedByKeys { path }
      partitionKeysByDimension { name partitionKeys }
      assetPartitionStatuses {
        __typename
        ... on DefaultPartitionStatuses { materializedPartitions failedPartitions }
        ... on MultiPartitionStatuses {
          primaryDimensionName
          ranges {
            primaryDimStartKey
            primaryDimEndKey
            secondaryDim { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
          }
        }
      }
    }
  }
}"""

MATERIALIZATIONS_QUERY = """
query Materializations($key: AssetKeyInput!, $partitions: [String!]) {
  assetOrError(assetKey: $key) {
    ... on Asset {
      assetMaterializations(partitions: $partitions) {
        runId
        partition
        metadataEntries { label ... on TextMetadataEntry { text } }
      }
    }
  }
}"""

REPOS_QUERY = "query { repositoriesOrError { __typename ... on RepositoryConnection { nodes { name jobs { name } } } } }"


@dataclass
class Stack:
    tmp: Path
    config: Path
    port: int
    dagster_log: Path
    run_ids: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        r = requests.post(f"{self.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=60)
        r.raise_for_status()
        body = r.json()
        assert not body.get("errors"), body["errors"]
        return body["data"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Stack]:
    """`dagster dev` on a tiny config, with one `dataset` and one `hidden_states` partition launched via GraphQL."""
    from dagster_graphql import DagsterGraphQLClient

    tmp = tmp_path_factory.mktemp("services")
    config = fast_config(tmp, tiny_model_dir, layers=[0])
    home = tmp / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    # automation off: this test launches each run itself (tests/graph/test_asset_graph.py covers automation)
    env = service_env(DAGSTER_HOME=str(home), MOSAIC_CONFIG=str(config), MOSAIC_AUTOMATION="off")

    # register the config's dynamic partitions in this instance, as a user would
    reg = subprocess.run([sys.executable, "-m", "mosaic_dag.cli", "partitions", "--config", str(config)], env=env,
                         cwd=tmp, timeout=STARTUP_S, capture_output=True, text=True, check=False)
    assert reg.returncode == 0 and "added 1 target and 1 dataset partitions" in reg.stdout, reg.stdout + reg.stderr

    port = free_port()
    log = tmp / "dagster-dev.log"
    cmd = [sys.executable, "-m", "dagster", "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)]
    with service(cmd, log, env, ROOT, signal.SIGINT) as proc:
        st = Stack(tmp, config, port, log)
        wait_until("dagster webserver", lambda: requests.get(f"{st.url}/server_info", timeout=5).ok, STARTUP_S, proc, log)
        jobs = wait_until(
            "code location 'mosaic'",
            lambda: [j["name"] for n in st.graphql(REPOS_QUERY)["repositoriesOrError"].get("nodes", []) for j in n["jobs"]],
            STARTUP_S, proc, log)
        assert "__ASSET_JOB" in jobs, jobs

        client = DagsterGraphQLClient("127.0.0.1", port_number=port, timeout=60)
        in_process = {"execution": {"config": {"in_process": {}}}}  # one process per run: faster to start
        multi = {"dagster/partition": f"{DATASET}|{TARGET}", "dagster/partition/dataset": DATASET,
                 "dagster/partition/target": TARGET}  # a multi-partition run carries its key per dimension too
        launches = {
            "dataset": {"dagster/partition": DATASET},
            "hidden_states": {"dagster/partition": DATASET},  # one forward pass per dataset serves every layer
            # then the chain to the report, so its page (with embedded figures) can be looked at
            "sae": {"dagster/partition": TARGET},
            "sae_codes": multi,
            "pooled_features": multi,
            "probes": multi,
            "report": {},
        }
        for asset, tags in launches.items():  # in order: hidden_states reads the dataset's parquet
            run_id = client.submit_job_execution("__ASSET_JOB", asset_selection=[asset], tags=tags, run_config=in_process)
            st.run_ids[asset] = run_id
            status = wait_until(f"run of {asset}",
                                lambda rid=run_id: (s := client.get_run_status(rid).value) in ("SUCCESS", "FAILURE", "CANCELED") and s,
                                RUN_S, proc, log)
            assert status == "SUCCESS", f"{asset} run {run_id} ended {status}\n{log_tail(log)}"
        yield st


def test_dagster_dev_graphql_launch_lineage_and_partition_status(stack: Stack):
    data = stack.graphql(LINEAGE_QUERY, {"key": {"path": ["hidden_states"]}})["assetNodeOrError"]
    assert data["__typename"] == "AssetNode"
    assert ["dataset"] in [k["path"] for k in data["dependencyKeys"]]  # lineage: dataset -> hidden_states
    dims = {d["name"]: d["partitionKeys"] for d in data["partitionKeysByDimension"]}
    assert list(dims.values()) == [[DATASET]]  # partitioned by dataset alone: one partition = one forward pass
    assert data["assetPartitionStatuses"]["materializedPartitions"] == [DATASET]
    codes = stack.graphql(LINEAGE_QUERY, {"key": {"path": ["sae_codes"]}})["assetNodeOrError"]
    dims = {d["name"]: d["partitionKeys"] for d in codes["partitionKeysByDimension"]}
    assert dims == {"dataset": [DATASET], "target": [TARGET]}
    assert ["hidden_states"] in [k["path"] for k in codes["dependencyKeys"]]

    ds = stack.graphql(LINEAGE_QUERY, {"key": {"path": ["dataset"]}})["assetNodeOrError"]
    assert ["hidden_states"] in [k["path"] for k in ds["dependedByKeys"]]
    assert ds["assetPartitionStatuses"]["materializedPartitions"] == [DATASET]
    assert ds["assetPartitionStatuses"]["failedPartitions"] == []

    for asset in ("dataset", "hidden_states"):
        mats = stack.graphql(MATERIALIZATIONS_QUERY, {"key": {"path": [asset]}})["assetOrError"]["assetMaterializations"]
        assert [m["runId"] for m in mats] == [stack.run_ids[asset]]  # materialized by the run we launched
        labels = {e["label"] for e in mats[0]["metadataEntries"]}
        assert "mlflow_run_id" in labels and "data_version" in labels and ("path" in labels or "caches" in labels)

    # the runs wrote where the config says
    assert (stack.tmp / "data" / "datasets" / "toy" / "en.parquet").exists()
    assert list((stack.tmp / "data" / "hidden" / "tiny" / "L0").glob("*/manifest.json"))


def test_asset_graph_page_in_headless_chromium(stack: Stack):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support.browser import headless_chromium

    with headless_chromium(stack.tmp) as driver:
        driver.get(f"{stack.url}/assets/hidden_states?view=lineage")

        def graph_shown(d) -> bool:  # type: ignore[no-untyped-def]
            for button in d.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):  # first-visit dialog
                button.click()
            text = d.find_element(By.TAG_NAME, "body").text
            return all(name in text.split() for name in ("dataset", "hidden_states", "sae")) and "partition" in text

        WebDriverWait(driver, 120, poll_frequency=1).until(graph_shown)
        time.sleep(2)  # let the graph layout settle before the picture
        for _ in range(5):  # the first-visit dialog can open late, over the graph: close it before the picture
            buttons = driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']")
            if not buttons:
                break
            for button in buttons:
                button.click()
            time.sleep(1)
        assert not driver.find_elements(By.XPATH, "//button[normalize-space()='Skip']")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dagster-asset-graph.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def test_report_asset_page_renders_its_figures_in_headless_chromium(stack: Stack):
    """The `report` asset's markdown metadata, opened in the real UI: every image decodes (data: URIs)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.support.browser import broken_images, headless_chromium

    with headless_chromium(stack.tmp) as driver:
        driver.get(f"{stack.url}/assets/report")
        show = "//*[normalize-space(text())='[Show Markdown]']"

        def link_shown(d) -> bool:  # type: ignore[no-untyped-def]
            for button in d.find_elements(By.XPATH, "//button[normalize-space()='Skip']"):  # first-visit dialog
                button.click()
            return bool(d.find_elements(By.XPATH, show))

        WebDriverWait(driver, 120, poll_frequency=1).until(link_shown)
        driver.find_elements(By.XPATH, show)[0].click()
        WebDriverWait(driver, 60, poll_frequency=1).until(
            lambda d: len(d.execute_script("return Array.from(document.images).filter(i => i.src.startsWith('data:image/png'))")) >= 2)
        time.sleep(2)  # every image decoded before the check and the picture
        figures = driver.execute_script("return Array.from(document.images).filter(i => i.src.startsWith('data:image/png')).length")
        assert figures >= 2 and broken_images(driver) == []
        driver.execute_script("Array.from(document.images).find(i => i.src.startsWith('data:image/png')).scrollIntoView()")
        time.sleep(1)
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dagster-report-asset.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


# --------------------------------------------------------------------------------------------- mlflow server


def test_mlflow_server_serves_the_runs_and_takes_remote_logging(stack: Stack):
    from mosaic_dag.tracking import tracked_run

    uri = yaml.safe_load(stack.config.read_text())["mlflow"]["tracking_uri"]
    port = free_port()
    log = stack.tmp / "mlflow-server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--default-artifact-root", (stack.tmp / "mlflow-artifacts").as_uri()]
    base = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    with service(cmd, log, service_env(), stack.tmp, signal.SIGTERM) as proc:
        wait_until("mlflow server", lambda: requests.get(f"http://127.0.0.1:{port}/health", timeout=5).ok, STARTUP_S, proc, log)

        exp = requests.get(f"{base}/experiments/get-by-name", params={"experiment_name": "mosaic"}, timeout=30).json()
        exp_id = exp["experiment"]["experiment_id"]
        runs = requests.post(f"{base}/runs/search", json={"experiment_ids": [exp_id], "max_results": 100},
                             timeout=30).json()["runs"]
        by_asset = {}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            by_asset[tags["dagster.asset_key"]] = (run, tags)
        assert {"dataset", "hidden_states", "sae", "probes", "report"} <= set(by_asset)
        for asset, (run, tags) in by_asset.items():
            assert run["info"]["status"] == "FINISHED"
            assert tags["dagster.run_id"] == stack.run_ids[asset]  # MLflow -> Dagster link
            params = {p["key"] for p in run["data"].get("params", [])}
            # secret-looking names never logged (counts such as config.training_tokens are settings, not secrets)
            assert params and not any(h in p.lower() for p in params
                                      for h in ("hf_token", "secret", "password", "api_key", "credential"))
            assert not any(re.search(r"(^|[._])(access_|auth_)?token$", p.lower()) for p in params), params
        metrics = {m["key"]: m["value"] for m in by_asset["hidden_states"][0]["data"]["metrics"]}
        assert metrics["tokens"] > 0 and metrics["texts"] > 0 and metrics["cache_hit"] == 0.0
        assert {m["key"]: m["value"] for m in by_asset["dataset"][0]["data"]["metrics"]}["texts"] == metrics["texts"]
        history = requests.get(f"{base}/metrics/get-history", timeout=30,
                               params={"run_id": by_asset["hidden_states"][0]["info"]["run_id"], "metric_key": "tokens"}).json()
        assert [m["value"] for m in history["metrics"]] == [metrics["tokens"]]

        # the same tracking code against the server (MLFLOW_TRACKING_URI=http://...): the scale-out setup
        remote = f"http://127.0.0.1:{port}"
        with tracked_run(remote, "mosaic-remote", "remote-check", {"dagster.asset_key": "remote_check"}) as run:
            run.log_params({"layer": 6, "hf_token": "hf_should_not_be_logged"})
            run.log_metrics({"macro_f1": 0.75, "not_finite": float("nan")})
        got = requests.get(f"{base}/runs/get", params={"run_id": run.run_id}, timeout=30).json()["run"]
        assert got["info"]["status"] == "FINISHED"
        assert {p["key"]: p["value"] for p in got["data"]["params"]} == {"layer": "6"}
        assert {m["key"]: m["value"] for m in got["data"]["metrics"]} == {"macro_f1": 0.75}
