"""sweep_temp removes only what mosaic's own killed writers left, only in mosaic's folders.

A data folder may be the user's project folder (``data_dir: .``): their dot-files ending in
``.tmp`` (editor drafts, sync tools' temp files) must survive any sweep, however old.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from mosaic_dag import storage
from mosaic_dag.storage import atomic_dir, atomic_path, is_temp_name, sweep_temp, temp_prefix


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, days: float) -> None:
    t = time.time() - days * 86400
    os.utime(path, (t, t))


def test_user_tmp_files_survive_and_dead_mosaic_temps_go(tmp_path: Path):
    data = tmp_path  # data_dir: . — the user's own files sit beside mosaic's folders
    user_files = [data / "notes" / ".draft.tmp", data / ".sync-123.tmp", data / "hidden" / ".mine.tmp",
                  data / "results" / ".x.1@deadbeef.abc.tmp"]  # looks like an owner tag, but no mosaic prefix
    for f in user_files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("keep me")
        _age(f, 30)
    dead = _dead_pid()
    host = storage._HOST
    dead_dir = data / "hidden" / "tiny" / "L0" / f".mosaic-tmp.key.{dead}@{host}.abc123.tmp"
    dead_dir.mkdir(parents=True)
    (dead_dir / "shard-0.safetensors").write_text("x")
    dead_file = data / "datasets" / "toy" / f".mosaic-tmp.en.parquet.{dead}@{host}.q1w2e3.tmp"
    dead_file.parent.mkdir(parents=True)
    dead_file.write_text("x")
    old_other_host = data / f".mosaic-tmp.mlflow.db.{dead}@00000000.zz.old.tmp"
    old_other_host.write_text("x")
    _age(old_other_host, 2)
    fresh_other_host = data / "results" / f".mosaic-tmp.r.parquet.{dead}@00000000.yy.tmp"
    fresh_other_host.write_text("x")  # another machine's writer, touched just now: keep
    outside = data / "notes" / f".mosaic-tmp.n.{dead}@{host}.aa.tmp"  # not a folder mosaic writes
    outside.write_text("x")
    mine_live = data / "codes" / f".mosaic-tmp.c.{os.getpid()}@{host}.bb.tmp"  # a live writer (this process)
    mine_live.parent.mkdir()
    mine_live.write_text("x")

    assert sweep_temp(data) == 3
    for f in user_files:
        assert f.read_text() == "keep me", f
    assert not dead_dir.exists() and not dead_file.exists() and not old_other_host.exists()
    assert fresh_other_host.exists() and outside.exists() and mine_live.exists()


def test_every_temp_name_mosaic_writes_is_recognised(tmp_path: Path, monkeypatch):
    seen: list[str] = []
    real_replace = os.replace

    def spy(src, dst):  # noqa: ANN001
        seen.extend(n for n in (Path(src).name, Path(dst).name) if n not in ("a.parquet", "cache"))
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", spy)
    with atomic_path(tmp_path / "a.parquet") as tmp:
        tmp.write_text("a")
    with atomic_dir(tmp_path / "cache") as tmp:
        (tmp / "f").write_text("1")
    with atomic_dir(tmp_path / "cache") as tmp:  # replacing: the old copy is moved aside under a temp name
        (tmp / "f").write_text("2")
    assert any(n.endswith(".old.tmp") for n in seen) and len(seen) >= 4 and all(is_temp_name(n) for n in seen), seen
    assert temp_prefix(tmp_path / "x").startswith(".mosaic-tmp.x.")
    assert not is_temp_name(".draft.tmp") and not is_temp_name(".a.12@0123abcd.xyz.tmp")
