"""Shared fixtures; the code behind them is in tests/support. Each test folder is a tier with its marker:
unit (library functions), graph (Dagster materializations in a real instance), system (services,
browser, PostgreSQL, killed and concurrent runs), integration (the real bundled Gemma)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.models import build_tiny_model
from tests.support.sae import fake_gemma_scope_2  # noqa: F401 - a fixture, shared by the SAE tests

TIERS = ("unit", "graph", "system", "integration")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).resolve().parent
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.is_relative_to(here) and (tier := path.relative_to(here).parts[0]) in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"))


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MOSAIC_CONFIG", raising=False)
    return home


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One Dagster instance and one MLflow store for the module (creating either costs seconds).

    Each test finds its own runs by the ``mosaic/config`` tag, which holds its config's path.
    """
    root = tmp_path_factory.mktemp("reliability")
    (root / "dagster_home").mkdir()
    (root / "dagster_home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DAGSTER_HOME", str(root / "dagster_home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for var in ("MOSAIC_CONFIG", "MOSAIC_PROGRESS"):
            mp.delenv(var, raising=False)
        yield root / "dagster_home"
        for var in ("MOSAIC_CONFIG", "MOSAIC_PROGRESS"):  # run_experiment exports these
            os.environ.pop(var, None)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _share_cores_between_workers() -> None:
    """Under pytest-xdist each worker gets its share of the cores (torch's default, all of them per
    worker, oversubscribes the machine and slows every worker down)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from mosaic_dag.runner import usable_cores

        torch.set_num_threads(max(1, usable_cores() // workers))


_share_cores_between_workers()
