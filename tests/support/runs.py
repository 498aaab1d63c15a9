"""Running mosaic the way users do (the CLI, subprocesses, a shared Dagster instance) and reading back
what it left: the one error line, the failed Dagster step, caches and temp files."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from mosaic_dag.cli import main
from tests.support.models import WORDS, fast_config

ROOT = Path(__file__).resolve().parents[2]
TEXTS_PER_DATASET = 240  # ~3 s of tiny-model forward passes per dataset at batch_tokens=64


def error_line(stderr: str) -> str:
    """The CLI's one ``mosaic: error:`` line; it must be the last line and appear once."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    ours = [ln for ln in lines if ln.startswith("mosaic: error: ")]
    assert len(ours) == 1, f"expected one 'mosaic: error:' line, got {ours!r}\n{stderr[-3000:]}"
    assert lines[-1] == ours[0], f"the error line is not the last line of stderr:\n{stderr[-3000:]}"
    return ours[0].removeprefix("mosaic: error: ")


def run_cli(config: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["run", "--config", str(config), "--quiet"])
    return code, capsys.readouterr().err


def _error_text(err: object) -> str:
    """Message of a SerializableErrorInfo with its causes and contexts."""
    parts = []
    while err is not None:
        parts.append(getattr(err, "message", "") or "")
        err = getattr(err, "cause", None) or getattr(err, "context", None)
    return "\n".join(parts)


def dagster_failures(config: Path) -> list[tuple[str, str]]:
    """(step key, error text) of every failed step of the runs `mosaic run --config config` made."""
    from dagster import DagsterEventType, DagsterInstance, RunsFilter

    instance = DagsterInstance.get()
    runs = instance.get_runs(filters=RunsFilter(tags={"mosaic/config": str(config.resolve())}))
    out = []
    for run in runs:
        for rec in instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_FAILURE):
            out.append((str(rec.step_key), _error_text(rec.dagster_event.step_failure_data.error)))
    return out


def assert_step_failed_with(config: Path, step: str, message: str) -> None:
    failures = dagster_failures(config)
    assert [s for s, _ in failures] == [step], failures
    assert message in failures[0][1], f"Dagster step {step!r} does not show {message!r}:\n{failures[0][1][:2000]}"


def temp_leftovers(folder: Path) -> list[Path]:
    """Temp files/folders of writers (finished writers leave none)."""
    return sorted(p for p in folder.rglob(".*.tmp")) if folder.exists() else []


def assert_no_dataset_artifact(data_dir: Path, dataset: str) -> None:
    assert not (data_dir / "datasets" / dataset).exists() or not any((data_dir / "datasets" / dataset).iterdir()), \
        f"partial dataset artifact left: {list((data_dir / 'datasets' / dataset).iterdir())}"
    assert not temp_leftovers(data_dir), temp_leftovers(data_dir)


def assert_no_hidden_artifact(data_dir: Path) -> None:
    hidden = data_dir / "hidden"
    files = [p for p in hidden.rglob("*") if p.is_file()] if hidden.exists() else []
    assert not files, f"partial hidden-state cache left: {files[:5]}"
    assert not temp_leftovers(data_dir), temp_leftovers(data_dir)


def write_texts(path: Path, n: int, seed: int) -> Path:
    """n distinct labelled texts (jsonl: text, label)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    with path.open("w") as fh:
        while len(seen) < n:
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
            if text in seen:
                continue
            seen.add(text)
            fh.write(json.dumps({"text": text, "label": int("idiot" in text or "hate" in text or len(seen) % 2)}) + "\n")
    return path


def slow_config(tmp_path: Path, model_dir: Path, n_datasets: int, layers: list[int]) -> Path:
    datasets = [{"name": f"d{i}", "path": str(write_texts(tmp_path / f"d{i}.jsonl", TEXTS_PER_DATASET, seed=i)),
                 "language": "en"} for i in range(n_datasets)]
    return fast_config(tmp_path, model_dir, layers=layers, datasets=datasets)


def finished_caches(data_dir: Path) -> dict[Path, int]:
    """Completed cache folders (not temp folders) -> their manifest's mtime."""
    out = {}
    for man in (data_dir / "hidden").rglob("manifest.json"):
        if any(part.startswith(".") for part in man.relative_to(data_dir).parts):
            continue  # inside a temp folder: not finished
        out[man.parent] = man.stat().st_mtime_ns
    return out


def mosaic_env(home: Path) -> dict[str, str]:
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    for var in ("MOSAIC_CONFIG", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return env


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
