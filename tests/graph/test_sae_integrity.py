"""A corrupt SAE is never used silently.

A trained SAE (mosaic's own folder) carries sha256 checksums written last: flipped bytes are caught
and the SAE is trained again, like a hidden-state cache. A user's SAE (no checksums) whose
reconstruction on the data is absurd stops the run with one line naming it; a truncated one names
its folder.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from mosaic_dag.sae.integrity import CHECKSUM_FILENAME, check_reconstruction, verify_checksums
from mosaic_dag.sae.loading import load_sae
from mosaic_dag.sae.spec import SaeCodesError, SaeLoadError
from mosaic_dag.sae.stats import EncodeStats
from tests.support.sae import make_sae
from tests.support.runs import error_line, run_cli, temp_leftovers
from tests.support.models import fast_config


def _data_region(weights: Path) -> tuple[int, int]:
    """(start, end) of the tensor bytes of a safetensors file (after its JSON header)."""
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return 8 + header_len, len(raw)


def test_flipped_bytes_in_a_trained_sae_retrain_it(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path,
                                                   capsys: pytest.CaptureFixture[str]):
    config = fast_config(tmp_path, tiny_model_dir, layers=[0])
    code, err = run_cli(config, capsys)
    assert code == 0, err
    (folder,) = (tmp_path / "data" / "saes" / "tiny" / "L0").iterdir()
    assert verify_checksums(folder) is True
    assert CHECKSUM_FILENAME in json.dumps(sorted(p.name for p in folder.iterdir()))
    weights = folder / "sae_weights.safetensors"
    good = weights.read_bytes()
    start, end = _data_region(weights)
    bad = bytearray(good)
    bad[start:start + 64] = b"\x7f" * 64  # silent bit rot, header intact: sae-lens would load it
    weights.write_bytes(bytes(bad))
    assert verify_checksums(folder) is False
    with pytest.raises(SaeLoadError, match="failed its checksum"):
        load_sae(path=folder)

    code, err = run_cli(config, capsys)
    assert code == 0, err
    assert verify_checksums(folder) is True  # trained again, with fresh checksums
    assert weights.read_bytes() != bytes(bad)
    assert temp_leftovers(tmp_path / "data") == []


def test_a_corrupt_local_sae_stops_the_run_naming_it(tmp_path: Path, tiny_model_dir: Path, dagster_home: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    sae = make_sae("jumprelu", d_in=64, width=64, hook_name="model.layers.0", model_name="tiny-gemma3")
    folder = tmp_path / "my_sae"
    sae.save_model(str(folder))
    weights = folder / "sae_weights.safetensors"
    start, end = _data_region(weights)
    raw = bytearray(weights.read_bytes())
    raw[start:end] = b"\x4f" * (end - start)  # every float becomes ~3.5e9: loads fine, reconstructs nonsense
    weights.write_bytes(bytes(raw))
    config = fast_config(tmp_path, tiny_model_dir, layers=[0],
                         saes=[{"origin": "local", "path": str(folder), "name": "mine"}])
    code, err = run_cli(config, capsys)
    assert code == 1
    line = error_line(err)
    assert line.startswith("sae 'mine' ") and ("absurd" in line or "non-finite" in line), line
    codes = tmp_path / "data" / "codes"
    assert not codes.exists() or not [p for p in codes.rglob("*") if p.is_file()]  # nothing partial
    assert not (tmp_path / "data" / "results").exists()
    assert temp_leftovers(tmp_path / "data") == []


def test_a_truncated_sae_file_names_its_folder(tmp_path: Path):
    sae = make_sae("jumprelu", d_in=64, width=64, hook_name="model.layers.0", model_name="tiny-gemma3")
    sae.save_model(str(tmp_path / "s"))
    weights = tmp_path / "s" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SaeLoadError) as exc:
        load_sae(path=tmp_path / "s")
    msg = str(exc.value)
    assert str(tmp_path / "s") in msg and "could not be read" in msg and "\n" not in msg


def test_reconstruction_check_thresholds():
    stats = EncodeStats(n_tokens=10, width=4, mean_l0=1.0, dead_fraction=0.0, explained_variance=0.3)
    fine = sp.csr_matrix(np.eye(4, dtype=np.float32))
    check_reconstruction("s", fine, stats)  # a sane SAE passes
    check_reconstruction("s", fine, EncodeStats(10, 4, 1.0, 0.0, -2.0))  # weak but plausible passes
    with pytest.raises(SaeCodesError, match="absurdly"):
        check_reconstruction("s", fine, EncodeStats(10, 4, 1.0, 0.0, -1.3e11))
    nan_codes = fine.copy()
    nan_codes.data[0] = np.nan
    with pytest.raises(SaeCodesError, match="non-finite"):
        check_reconstruction("s", nan_codes, stats)
