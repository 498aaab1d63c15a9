"""A real full disk at each write stage: `mosaic run` with its data folder on a small tmpfs.

The tmpfs is mounted in a private user + mount namespace (``unshare -rm``: no root needed, nothing
visible outside the test). A filler file (the user's own) leaves free only what earlier stages still lack
plus half of the next stage's artifacts, so the disk fills during that stage. For each stage the run must end with exactly one
``mosaic: error:`` line naming a path of that stage and "No space left on device", exit 1, no
traceback, no temp file and no half artifact; the next run (with a little more room) resumes from
what was finished. With room again, a last run completes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.runs import error_line
from tests.support.models import fast_config
from tests.support.runs import mosaic_env

PAGE = 4096
TMPFS_BYTES = 64 << 20
STAGES = ["datasets", "hidden", "saes", "codes", "pooled", "predictions", "results", "report"]  # the order a run writes them


def _unshare_works() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"], capture_output=True)
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _unshare_works(),
                                reason="needs `unshare -rm` and tmpfs mounts in a user namespace (util-linux)")

# Runs inside the namespace, with the tmpfs mounted on data_dir: one `mosaic run` per stage.
DRIVER = r"""
import json, os, subprocess, sys
from pathlib import Path

config, data_dir, out, pages = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), json.loads(sys.argv[4])
filler = data_dir / "filler.bin"
PAGE = 4096


def leave_free(n_bytes):
    st = os.statvfs(data_dir)
    free = st.f_bavail * st.f_frsize
    size = filler.stat().st_size if filler.exists() else 0
    with open(filler, "ab") as fh:
        fh.truncate(max(0, size + free - n_bytes))
    with open(filler, "r+b") as fh:  # touch every page so tmpfs really allocates them
        for off in range(0, filler.stat().st_size, PAGE):
            fh.seek(off); fh.write(b"\0")


def pages_now(stage):
    return sum(-(-p.stat().st_size // PAGE) for p in (data_dir / stage).rglob("*") if p.is_file())


def files():
    return sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if p.is_file())


cmd = [sys.executable, "-m", "mosaic_dag.cli", "run", "--config", config, "--quiet"]
results = []
stages = list(pages)
for i, stage in enumerate(stages):
    # room for what earlier stages still lack (the stage the last run failed in left nothing, or only
    # some complete files), plus half of this stage's artifacts: the disk fills during this stage
    missing = sum(max(0, pages[s] - pages_now(s)) for s in stages[:i])
    free = (missing + pages[stage] // 2) * PAGE
    leave_free(free)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    results.append({"stage": stage, "free": free, "rc": proc.returncode, "stderr": proc.stderr, "files": files()})
filler.unlink()
proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
results.append({"stage": "all", "rc": proc.returncode, "stderr": proc.stderr, "files": files()})
out.write_text(json.dumps(results))
"""


def _pages(folder: Path) -> int:
    return sum(-(-p.stat().st_size // PAGE) for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def test_a_full_disk_at_each_write_stage_is_one_line_and_leaves_nothing_partial(tmp_path: Path, tiny_model_dir: Path):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    data_dir = tmp_path / "data"
    ref = subprocess.run([sys.executable, "-m", "mosaic_dag.cli", "run", "--config", str(config), "--quiet"],
                         cwd=tmp_path, env=mosaic_env(tmp_path / "home-ref"), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-3000:]
    pages = {stage: _pages(data_dir / stage) for stage in STAGES}
    assert all(pages.values()), pages
    assert sorted(p.name for p in data_dir.iterdir()) == sorted(STAGES), "a stage writes somewhere this test misses"
    shutil.rmtree(data_dir)
    data_dir.mkdir()

    out = tmp_path / "disk-full.json"
    script = f'mount -t tmpfs -o size={TMPFS_BYTES} tmpfs "$1" && exec "$2" -c "$3" "$4" "$1" "$5" "$6"'
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(data_dir), sys.executable, DRIVER,
                           str(config), str(out), json.dumps(pages)],
                          cwd=tmp_path, env=mosaic_env(tmp_path / "home"), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())

    for r in results[:-1]:
        stage, stderr = r["stage"], r["stderr"]
        assert r["rc"] == 1, f"{stage}: exit {r['rc']} with {r['free']} bytes free\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, f"{stage}:\n{stderr[-3000:]}"
        line = error_line(stderr)
        assert "No space left on device" in line and "could not write" in line, f"{stage}: {line}"
        assert f"{data_dir}/{stage}" in line, f"{stage}: the failing write is not in {stage}/: {line}"
        assert not [f for f in r["files"] if ".mosaic-tmp." in f], f"{stage}: temp files left: {r['files']}"
        assert "filler.bin" in r["files"]
        if stage in ("datasets", "results"):  # one artifact each in this config: none may be left
            assert not [f for f in r["files"] if f.startswith(f"{stage}/")], f"{stage}: partial artifact: {r['files']}"
        if stage == "report":  # plots are whole files; the page that lists them is written last
            assert "report/index.md" not in r["files"], r["files"]
    last = results[-1]
    assert last["rc"] == 0, last["stderr"][-3000:]  # with room again, the run resumes and completes
    assert (os.sep.join(["report", "index.md"])) in last["files"]
    assert not [f for f in last["files"] if ".mosaic-tmp." in f]
