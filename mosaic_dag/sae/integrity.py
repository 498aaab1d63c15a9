"""Integrity: checksums of SAE folders mosaic writes, and a sanity check of what an SAE reconstructs."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from mosaic_dag.sae.spec import SaeCodesError

if TYPE_CHECKING:
    from mosaic_dag.sae.stats import EncodeStats

log = logging.getLogger(__name__)

__all__ = ["ABSURD_EXPLAINED_VARIANCE", "CHECKSUM_FILENAME", "check_reconstruction", "discard_if_corrupt",
           "verify_checksums", "write_checksums"]


CHECKSUM_FILENAME = "mosaic_checksums.json"
# Explained variance below this is not a weak SAE but a broken one (corrupt weights, wrong scaling).
# A weak SAE on data with a large mean and a small spread (image soft tokens of a small random vision
# tower, seen at -825) can score far below zero; corrupt weights score many orders further down.
ABSURD_EXPLAINED_VARIANCE = -1e4


def write_checksums(folder: str | Path) -> Path:
    """sha256 of every file in an SAE folder, written last (inside the folder's atomic write)."""
    from mosaic_dag.storage import file_sha256

    folder = Path(folder)
    sums = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUM_FILENAME}
    out = folder / CHECKSUM_FILENAME
    out.write_text(json.dumps({"sha256": sums}, indent=2, sort_keys=True))
    return out


def verify_checksums(folder: str | Path) -> bool | None:
    """True when every listed file matches; False when one differs or is missing; None: no checksums
    (an SAE that mosaic did not write, which ``check_reconstruction`` still guards)."""
    from mosaic_dag.storage import file_sha256

    folder = Path(folder)
    try:
        listed = json.loads((folder / CHECKSUM_FILENAME).read_text())["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return False
    try:
        return all(file_sha256(folder / name) == digest for name, digest in listed.items())
    except OSError:
        return False


def discard_if_corrupt(folder: str | Path) -> bool:
    """Remove a trained-SAE folder (mosaic's own) whose checksum fails, so it is trained again; True if removed."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir() or verify_checksums(folder) is not False:
        return False
    log.warning("trained SAE %s failed its checksum; removing it so it is trained again", folder)
    shutil.rmtree(folder, ignore_errors=True)
    return True


def check_reconstruction(name: str, codes: sp.csr_matrix, stats: "EncodeStats") -> None:
    """Refuse an SAE whose codes are not finite or whose reconstruction is absurd on this data."""
    bad = int((~np.isfinite(codes.data)).sum()) if codes.nnz else 0
    if bad:
        raise SaeCodesError(
            f"sae {name!r} produced {bad} non-finite codes on this data; its weights are corrupt or do not fit "
            "this model: re-save or re-download the SAE, or delete a trained one so it is trained again"
        )
    ev = stats.explained_variance
    if stats.n_tokens and (ev < ABSURD_EXPLAINED_VARIANCE or ev == math.inf):
        raise SaeCodesError(
            f"sae {name!r} reconstructs this data absurdly (explained variance {ev:.3g}, below "
            f"{ABSURD_EXPLAINED_VARIANCE:g}); its weights are corrupt or do not fit this model/layer: "
            "re-save or re-download the SAE, or delete a trained one so it is trained again"
        )

