"""What `mosaic run`, `mosaic results` and the report show: exactly the current config's partitions.

Results an earlier config left in the same data folder (another layer) stay on disk and are listed
only with ``mosaic results --all``. Also: a corrupt results file, `mosaic results | head`, and an
unknown ``--format`` each end in one line (or, for the closed pipe, quietly), never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mosaic_dag.cli import main
from tests.support.runs import error_line
from tests.support.models import fast_config
from tests.support.runs import mosaic_env


def _set_layers(config: Path, layers: list[int]) -> None:
    data = yaml.safe_load(config.read_text())
    data["models"][0]["layers"] = layers
    config.write_text(yaml.safe_dump(data))


def _csv(capsys: pytest.CaptureFixture[str], *args: str) -> pd.DataFrame:
    assert main(["results", *args, "--format", "csv"]) == 0
    return pd.read_csv(StringIO(capsys.readouterr().out))


def test_output_is_the_current_configs_partitions_only(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    assert main(["run", "--config", str(config), "--quiet"]) == 0
    capsys.readouterr()
    _set_layers(config, [2])  # the user moves on to another layer, same data folder
    assert main(["run", "--config", str(config), "--quiet"]) == 0
    printed = capsys.readouterr().out
    best = printed.split("selected probe per feature source")[1].split("\n\n")[1]
    layer_col = best.splitlines()[0].split("|").index(" layer ")
    assert {row.split("|")[layer_col].strip() for row in best.splitlines()[2:]} == {"2"}, best

    current = _csv(capsys, "--config", str(config))
    assert set(current["layer"]) == {2} and len(current)
    every = _csv(capsys, "--config", str(config), "--all")  # the old rows are still on disk, on request
    assert set(every["layer"]) == {0, 2}
    assert len(every) > len(current)

    report = (tmp_path / "data" / "report" / "index.md").read_text()
    assert f"{len(current)} probe rows" in report  # the report counts (and plots) only layer 2's rows
    html_page = tmp_path / "data" / "report" / "index.html"
    html_page.unlink()
    assert main(["report", "--config", str(config)]) == 0  # rebuilt from the stored results, path printed
    assert capsys.readouterr().out.strip() == str(html_page)
    assert html_page.read_text().count("src='data:image/png;base64,") >= 3

    # a corrupt results file of the current config: one line naming it and the fix
    victim = tmp_path / "data" / "results" / "tiny.L2.s16" / "toy.en.parquet"
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    assert main(["results", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err)
    assert str(victim) in line and "not readable parquet" in line and "run `mosaic run --config` again" in line


def test_report_without_results_is_one_line(tmp_path: Path, tiny_model_dir: Path, capsys):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    assert main(["report", "--config", str(config)]) == 1
    line = error_line(capsys.readouterr().err)
    assert "no results under" in line and f"run --config {config}" in line
    assert not (tmp_path / "data" / "report").exists()


def test_results_into_a_closed_pipe_stops_quietly(tmp_path: Path, tiny_model_dir: Path):
    """`mosaic results | head`: the reader is gone before mosaic writes; no BrokenPipeError traceback."""
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    from mosaic_dag.evaluation.schema import RESULT_COLUMNS

    results = tmp_path / "data" / "results" / "tiny.L0.s16"
    results.mkdir(parents=True)
    row = {c: 0 for c in RESULT_COLUMNS} | {"model": "tiny", "sae": "s16", "dataset": "toy", "language": "en"}
    pd.DataFrame([row] * 5000).to_parquet(results / "toy.en.parquet")  # more than a pipe buffer of CSV
    proc = subprocess.Popen([sys.executable, "-m", "mosaic_dag.cli", "results", "--config", str(config), "--format", "csv"],
                            cwd=tmp_path, env=mosaic_env(tmp_path / "home"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()  # like `head -1`: read a line, then go away
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and err.strip() == "", err


def test_unknown_format_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exc:
        main(["results", "--format", "json"])
    assert exc.value.code == 1
    line = error_line(capsys.readouterr().err)
    assert "invalid choice: 'json'" in line and "--help" in line
