"""Concurrent runs: two processes materializing the same partition leave one valid cache, never a mix; two
worker processes give the same results as one.

Every artifact is written into a temp folder/file and renamed into place (``atomic_dir`` /
``atomic_path``); whichever writer renames last wins, whole.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from mosaic_dag import storage
from mosaic_dag.config import load_config
from mosaic_dag.lm.extract import HiddenCache
from mosaic_dag.runner import run_experiment
from mosaic_dag.storage import atomic_dir
from tests.support.models import fast_config, two_dataset_config
from tests.support.runs import temp_leftovers
from tests.support.runs import TEXTS_PER_DATASET, finished_caches, kill_group, mosaic_env, write_texts

ROOT = Path(__file__).resolve().parents[2]


def test_interleaved_atomic_dirs_leave_one_complete_folder(tmp_path: Path):
    target = tmp_path / "cache"
    with atomic_dir(target) as a:
        for i in range(3):
            (a / f"part-{i}").write_text("A")
        with atomic_dir(target) as b:  # a second writer starts and finishes while the first is mid-write
            for i in range(5):
                (b / f"part-{i}").write_text("B")
        assert {p.read_text() for p in target.iterdir()} == {"B"} and len(list(target.iterdir())) == 5
        (a / "part-3").write_text("A")
    assert sorted(p.name for p in target.iterdir()) == [f"part-{i}" for i in range(4)]
    assert {p.read_text() for p in target.iterdir()} == {"A"}  # the last rename wins, whole
    assert temp_leftovers(tmp_path) == []


HAMMER = r"""
import json, sys, time
from pathlib import Path
from mosaic_dag.storage import atomic_dir, atomic_path

root, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))  # start together
for r in range(rounds):
    with atomic_dir(root / "cache") as tmp:
        files = {f"shard-{i}": f"{me}:{r}:{i}" * 2000 for i in range(4)}
        for name, text in files.items():
            (tmp / name).write_text(text)
        (tmp / "manifest.json").write_text(json.dumps({"writer": me, "round": r, "files": sorted(files)}))
    with atomic_path(root / "table.json") as tmp:
        tmp.write_text(json.dumps({"writer": me, "round": r, "pad": "x" * 50000}))
"""


def test_many_processes_racing_on_one_target_leave_one_writers_complete_output(tmp_path: Path):
    start = time.time() + 3.0
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, str(tmp_path), f"w{i}", "30", str(start)],
                              env=mosaic_env(tmp_path), stderr=subprocess.PIPE, text=True) for i in range(4)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]  # no writer failed because another was renaming
    man = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([*man["files"], "manifest.json"])
    for name in man["files"]:  # every shard is from the writer and round the manifest names
        assert (tmp_path / "cache" / name).read_text().startswith(f"{man['writer']}:{man['round']}:")
    assert json.loads((tmp_path / "table.json").read_text())["round"] == 29
    assert temp_leftovers(tmp_path) == []


def _hidden_metadata(home: Path) -> list[dict]:
    """Metadata of every hidden_states materialization recorded in one Dagster instance."""
    from dagster import AssetKey, DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(AssetKey("hidden_states"), limit=100).records
        return [{k: getattr(v, "value", v) for k, v in r.asset_materialization.metadata.items()} for r in records]


N_TEXTS = 2 * TEXTS_PER_DATASET  # ~6 s of forward passes: long enough that the two runs overlap


def test_two_first_runs_on_one_fresh_instance_both_succeed(tmp_path: Path, tiny_model_dir: Path):
    """Two `mosaic run`s at once on ONE fresh DAGSTER_HOME (no dagster.yaml, no sqlite files yet) and
    one data folder: both exit 0, the instance stays usable (one schema head), and the cache they both
    wrote is one writer's complete output."""
    data = write_texts(tmp_path / "d0.jsonl", N_TEXTS, seed=7)
    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2],
                         datasets=[{"name": "d0", "path": str(data), "language": "en"}])
    home = tmp_path / "home"  # does not exist yet: each run creates it, the sqlite schema, the partitions
    procs = []
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "run", "--config", str(config), "--quiet"],
                                          cwd=tmp_path, env=mosaic_env(home), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, start_new_session=True))
        results = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p)
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, (out + err)[-4000:]
        assert "Traceback" not in err and "IntegrityError" not in err, err[-4000:]
        assert "Telemetry" not in err and "Welcome to Dagster" not in err, err[-4000:]  # the CLI's instance: no banner
        assert "it/s]" not in err and "%|" not in err, err[-4000:]  # --quiet: no progress bar of any library

    caches = finished_caches(tmp_path / "data")
    assert sorted(p.parent.name for p in caches) == ["L0", "L2"]  # one folder per layer, not one per writer
    for folder in caches:
        cache = HiddenCache(folder)
        man = cache.manifest()
        assert cache.is_valid(deep=True)
        assert sorted(p.name for p in folder.iterdir()) == sorted([*(s["file"] for s in man["shards"]), "manifest.json"])
        full = cache.load_all()
        assert len(full.rows) == N_TEXTS and int(full.offsets[-1]) == man["tokens"]
    assert temp_leftovers(tmp_path / "data") == []
    assert (tmp_path / "data" / "datasets" / "d0" / "en.parquet").exists()

    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:  # still usable: a broken schema raises here
        assert instance.get_dynamic_partitions("dataset") == ["d0.en"]
        assert sorted(instance.get_dynamic_partitions("target")) == ["tiny.L0.s16", "tiny.L2.s16"]
        runs = instance.get_runs()
        assert len(runs) >= 2 and all(r.is_success for r in runs)
    metadata = _hidden_metadata(home)
    if sum(1 for m in metadata if not m["cache_hit"]) < 2:  # both must have written for the rename race
        pytest.fail("the two runs did not overlap (only one computed the cache); make the dataset bigger")
    # a third run on the same instance still works (the broken-instance symptom was every later run failing)
    third = subprocess.run([sys.executable, "-m", "mosaic_dag.cli", "validate", "--config", str(config)],
                           cwd=tmp_path, env=mosaic_env(home), capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr[-3000:]
    part = subprocess.run([sys.executable, "-m", "mosaic_dag.cli", "partitions", "--config", str(config)],
                          cwd=tmp_path, env=mosaic_env(home), capture_output=True, text=True, timeout=120)
    assert part.returncode == 0 and "added 0 target and 0 dataset partitions" in part.stdout, part.stderr[-3000:]


def test_four_first_registrations_on_one_fresh_instance(tmp_path: Path, tiny_model_dir: Path):
    """`mosaic partitions` x4 at the same instant on a fresh DAGSTER_HOME: without the instance lock this
    failed with `UNIQUE constraint failed: alembic_version`, left two schema heads (every later command
    failing), or added every partition twice."""
    config = fast_config(tmp_path, tiny_model_dir, layers=[0, 2])
    home = tmp_path / "home"
    procs = [subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "partitions", "--config", str(config)],
                              cwd=tmp_path, env=mosaic_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, (out + err)[-3000:]
    added = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert added == ["added 0 target and 0 dataset partitions"] * 3 + ["added 2 target and 1 dataset partitions"]
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home)) as instance:
        assert instance.get_dynamic_partitions("dataset") == ["toy.en"]
        assert instance.get_dynamic_partitions("target") == ["tiny.L0.s16", "tiny.L2.s16"]
        assert instance.get_runs_count() == 0


def test_rename_retries_when_the_blocking_folder_vanished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Writer A's rename fails (B's folder is there), then C moves B's folder aside before A looks:
    A must try again rather than fail (the race the hammer test above hit once in CI)."""
    real_replace, calls = os.replace, []

    def flaky(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 1:  # target absent by the time A checks: it was moved aside meanwhile
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", flaky)
    with atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "part").write_text("A")
    assert (tmp_path / "cache" / "part").read_text() == "A" and len(calls) == 2


def test_two_workers_run_a_stages_partitions_at_once_with_the_same_results(tmp_path: Path, tiny_model_dir: Path,
                                                                           dagster_home: Path):
    """Independent partitions in two worker processes: the same table as one at a time."""
    from mosaic_dag.evaluation.results import results_table
    from mosaic_dag.evaluation.schema import RESULT_COLUMNS

    tables = {}
    for workers in (1, 2):
        folder = tmp_path / f"w{workers}"
        folder.mkdir()
        config = two_dataset_config(folder, tiny_model_dir, train_on=None)
        lines: list[str] = []
        summary = run_experiment(config, progress=False, echo=lines.append, workers=workers)
        assert {s.asset for s in summary.steps} >= {"dataset", "hidden_states", "sae", "probes", "report"}
        assert (f"{workers} workers" in lines[0]) == (workers > 1)
        tables[workers] = results_table(load_config(config))
    cols = [c for c in RESULT_COLUMNS if c != "mlflow_run_id"]
    pd.testing.assert_frame_equal(tables[1][cols], tables[2][cols])
    assert set(tables[2]["dataset"]) == {"toy", "other"}
