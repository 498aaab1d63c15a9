"""Killed runs: `mosaic run` SIGKILLed mid-way, then run again.

The rerun must complete, must not recompute what the killed run had finished (content-addressed
caches are hits, their manifests untouched), must leave only valid caches, and must not trip over
the temp folders the killed writer left behind (``sweep_temp`` at run start removes those of dead
writers, and only those).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.storage import sweep_temp
from tests.support.runs import (
    TEXTS_PER_DATASET,
    finished_caches,
    kill_group,
    mosaic_env,
    slow_config,
    temp_leftovers,
)

ROOT = Path(__file__).resolve().parents[2]


LIVE_WRITER = """
import sys, time
from pathlib import Path
from mosaic_dag.storage import atomic_dir

with atomic_dir(Path(sys.argv[1])) as tmp:
    (tmp / "part").write_text("x")
    print("writing", flush=True)
    time.sleep(600)
"""


def test_killed_run_resumes_without_recomputing_or_corrupting(tmp_path: Path, tiny_model_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    config = slow_config(tmp_path, tiny_model_dir, n_datasets=2, layers=[0])
    data_dir = tmp_path / "data"
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")

    # 1. run, and SIGKILL the whole process group once a partition is cached and the next is mid-write
    proc = subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "run", "--config", str(config), "--quiet"],
                            cwd=tmp_path, env=mosaic_env(home), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while True:
            done = finished_caches(data_dir) if (data_dir / "hidden").exists() else {}
            writing = [p for p in (data_dir / "hidden").rglob(".*.tmp")] if done else []
            if done and writing:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                pytest.fail(f"`mosaic run` ended (rc={proc.returncode}) before it could be killed mid-way; "
                            f"make the config slower\n{proc.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("no hidden-state partition finished within 240 s")
            time.sleep(0.02)
    finally:
        kill_group(proc)
        proc.stderr.close()

    finished = finished_caches(data_dir)
    leftovers = temp_leftovers(data_dir)
    assert finished and leftovers, "the kill did not land between two partitions"
    assert all(HiddenCache(p).is_valid(deep=True) for p in finished)

    # 2. a live writer elsewhere (another run on this data folder) must keep its temp folder
    live_target = data_dir / "hidden" / "other-run" / "cache"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(live_target)], env=mosaic_env(home),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert live.stdout.readline().strip() == "writing"
        live_tmp = [p for p in live_target.parent.glob(".*.tmp")]
        assert len(live_tmp) == 1

        # 3. run again, in this process, to completion
        from mosaic_dag.runner import run_experiment

        monkeypatch.setenv("DAGSTER_HOME", str(home))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("MOSAIC_CONFIG", raising=False)
        summary = run_experiment(config, progress=False, echo=lambda *_: None)
        os.environ.pop("MOSAIC_PROGRESS", None)

        hidden_steps = [s for s in summary.steps if s.asset == "hidden_states"]
        assert len(hidden_steps) == 2  # 1 layer x 2 datasets
        by_path = {Path(p): s.metadata for s in hidden_steps for p in s.metadata["paths"].values()}
        for cache_dir, mtime in finished.items():
            assert by_path[cache_dir]["cache_hit"] is True, f"{cache_dir} was recomputed"
            assert (cache_dir / "manifest.json").stat().st_mtime_ns == mtime
        assert sum(1 for m in by_path.values() if not m["cache_hit"]) >= 1  # the killed partition was redone
        caches = finished_caches(data_dir)
        assert len(caches) == 2 and all(HiddenCache(p).is_valid(deep=True) for p in caches)
        for p in caches:
            man = json.loads((p / "manifest.json").read_text())
            assert man["texts"] == TEXTS_PER_DATASET
            assert len(HiddenCache(p).load_all().rows) == TEXTS_PER_DATASET
        assert {s.asset for s in summary.steps} >= {"dataset", "hidden_states"}

        # the killed writer's temp folders are gone; the live writer's is still there
        assert temp_leftovers(data_dir) == live_tmp
    finally:
        kill_group(live)
        live.stdout.close()
    assert not live_target.exists()  # it never finished, so it never appeared
    assert sweep_temp(data_dir) == 1 and temp_leftovers(data_dir) == []
