"""What every config section shares: the strict base model, key checks, and the pooling names."""

from __future__ import annotations

import re
from typing import Annotated, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")

Pooling = Literal["sum", "mean", "max", "last", "topn_count"]
POOLINGS: Final[tuple[str, ...]] = get_args(Pooling)
# what a hidden state (dense) pools by; topn_count counts active SAE latents, so it is sparse only
DENSE_POOLINGS: Final[tuple[str, ...]] = tuple(p for p in POOLINGS if p != "topn_count")


class _Strict(BaseModel):
    # strict: `layers: [true]` is not layer 1 and `bootstrap: yes` is not 1 resample; no NaN/inf anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


PositiveInt = Annotated[int, Field(ge=1)]


def _check_key(value: str, field: str) -> str:
    if not _KEY_RE.match(value):
        raise ValueError(
            f"{field} {value!r} may hold only letters, digits, '_' and '-' (it becomes a partition key)"
        )
    return value
