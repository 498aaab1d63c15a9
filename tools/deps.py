"""The locked dependency set: refresh it, or try the newest releases without touching it.

``python tools/deps.py lock``          fresh virtualenv with the newest versions pyproject.toml allows, the
                                       whole test suite in it; only if it passes, requirements.lock is rewritten.
``python tools/deps.py check-latest``  the same environment, the fast tests and the fused-forward checks only;
                                       prints which pins would move and what broke. Changes nothing.

Both build the environment under a temporary folder and delete it afterwards. torch is installed first
at the pinned CPU build and held there (an unpinned torch pulls a CUDA build of several GB).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
TORCH = "torch==2.13.0"
HEADER = (
    "# The exact versions the test suite passed with; installed by `make setup` and .ci/run as pip constraints.\n"
    "# Refresh with `make lock` (newest allowed versions, full test suite, rewritten only if it passes).\n"
)
# The fast tier: everything but the real-model, service and process tests, plus the fused-forward checks.
FAST_TESTS = ["-n", "logical", "--dist", "worksteal", "tests/unit", "tests/graph", "-m", "not integration"]
FUSED_TESTS = ["tests/unit/test_fused.py", "tests/unit/test_extract.py"]


def _pins(text: str) -> dict[str, str]:
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _run(cmd: list[str], **kw: object) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, **kw)  # type: ignore[arg-type]


def build_latest(folder: Path) -> Path:
    """A virtualenv in ``folder`` with this project and the newest versions its ranges allow."""
    venv = folder / "venv"
    if _run([sys.executable, "-m", "venv", str(venv)]):
        raise SystemExit("deps: could not create a virtualenv")
    py = venv / "bin" / "python"
    keep = folder / "torch-constraint.txt"
    keep.write_text(TORCH + "\n")  # "newest" never means another torch build (a CUDA one is several GB)
    for step in (["install", "-q", "--upgrade", "pip"], ["install", "-q", TORCH],
                 ["install", "-q", "--upgrade", "--upgrade-strategy", "eager", "-c", str(keep), "-e", f"{ROOT}[test]"]):
        if _run([str(py), "-m", "pip", *step]):
            raise SystemExit(f"deps: pip {' '.join(step)} failed")
    return py


def freeze(py: Path) -> str:
    out = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable"], check=True,
                         capture_output=True, text=True).stdout
    lines = []
    for line in sorted(out.splitlines(), key=str.lower):
        if line.lower().startswith("torch==") and "+" in line:
            line = line.split("+")[0]  # the local "+cpu" tag is not a version pip can resolve from an index
        if line and not line.startswith("#"):
            lines.append(line)
    return HEADER + "\n".join(lines) + "\n"


def moved(old: dict[str, str], new: dict[str, str]) -> list[str]:
    rows = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) != new.get(name):
            rows.append(f"  {name}: {old.get(name, '-')} -> {new.get(name, '-')}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["lock", "check-latest"])
    parser.add_argument("--keep", action="store_true", help="keep the temporary environment")
    args = parser.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix="mosaic-deps-"))
    try:
        py = build_latest(folder)
        frozen = freeze(py)
        changes = moved(_pins(LOCK.read_text()) if LOCK.exists() else {}, _pins(frozen))
        print("versions that differ from requirements.lock:" if changes else "requirements.lock is already the newest set")
        print("\n".join(changes))
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        if args.command == "lock":
            rc = _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env)
            if rc:
                print(f"deps: the suite failed on the newest versions (exit {rc}); requirements.lock unchanged")
                return 1
            tmp = LOCK.with_name(LOCK.name + ".new")
            tmp.write_text(frozen)
            tmp.replace(LOCK)
            print(f"deps: wrote {LOCK.relative_to(ROOT)} ({len(_pins(frozen))} pins)")
            return 0
        broke = []
        for name, tests in (("fast tests", FAST_TESTS), ("fused-forward checks", FUSED_TESTS)):
            if _run([str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests], cwd=ROOT, env=env):
                broke.append(name)
        print("check-latest: " + (f"BROKEN on the newest versions: {', '.join(broke)}" if broke
                                  else "the newest allowed versions pass the fast tests and the fused-forward checks"))
        return 1 if broke else 0
    finally:
        if args.keep:
            print(f"environment kept in {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
