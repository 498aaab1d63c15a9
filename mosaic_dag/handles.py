"""What one step hands the next: small typed records of where an artifact is and what it holds.

A step takes its inputs as handles and returns a handle; it never rebuilds its upstream. Each handle
has a ``version`` — the content key its artifact is stored under — which the Dagster assets report as
their data version, so staleness in the UI follows the data. Handles are plain JSON (no pickle).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from mosaic_dag.errors import MosaicError
from mosaic_dag.storage import stable_hash


class UpstreamMissing(MosaicError):
    """A step's input was never materialized (or its artifact is gone): materialize the upstream first."""


H = TypeVar("H", bound="Handle")


@dataclass(frozen=True)
class Handle:
    kind: ClassVar[str] = "handle"

    @property
    def version(self) -> str:
        raise NotImplementedError

    def exists(self) -> bool:
        """The artifact is still on disk (a deleted data folder means: materialize again)."""
        return True

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls: type[H], text: str) -> H:
        raw = json.loads(text)
        kind = raw.pop("kind", None)
        target = HANDLES.get(str(kind))
        if target is None or not issubclass(target, cls):
            raise MosaicError(f"not a {cls.kind} handle: {kind!r}")
        return target._from_dict(raw)  # type: ignore[return-value]

    @classmethod
    def _from_dict(cls: type[H], raw: dict[str, Any]) -> H:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


@dataclass(frozen=True)
class DatasetHandle(Handle):
    """One (dataset, language) partition's normalised parquet."""

    kind: ClassVar[str] = "dataset"
    key: str
    path: str
    content_hash: str  # ids and texts: what the hidden-state caches are keyed on
    rows: int
    splits_hash: str = ""
    labels_hash: str = ""

    @property
    def version(self) -> str:
        return stable_hash([self.content_hash, self.splits_hash, self.labels_hash])

    def exists(self) -> bool:
        return Path(self.path).exists()


@dataclass(frozen=True)
class HiddenHandle(Handle):
    """Hidden-state caches of one dataset partition: one folder per configured (model, layer) site."""

    kind: ClassVar[str] = "hidden_states"
    dataset: dict[str, Any]
    caches: dict[str, str] = field(default_factory=dict)  # "<model>.L<layer>" -> cache folder

    @property
    def data(self) -> DatasetHandle:
        return DatasetHandle._from_dict(self.dataset)

    @property
    def version(self) -> str:
        return stable_hash({site: Path(path).name for site, path in sorted(self.caches.items())})

    def cache(self, model: str, layer: int) -> Path:
        site = f"{model}.L{layer}"
        if site not in self.caches:
            raise UpstreamMissing(
                f"hidden_states partition {self.data.key!r} has no cache for {site} (it holds {sorted(self.caches)}); "
                "re-materialize hidden_states for it (the config changed since)"
            )
        return Path(self.caches[site])

    def exists(self) -> bool:
        return all((Path(p) / "manifest.json").exists() for p in self.caches.values())


@dataclass(frozen=True)
class SaeHandle(Handle):
    """The SAE of one target: where it loads from, what it is, and what it was trained on."""

    kind: ClassVar[str] = "sae"
    target: str
    origin: str  # registry | local | train
    identity: str
    path: str | None = None
    release: str | None = None
    sae_id: str | None = None
    width: int = 0
    architecture: str = ""
    training_data: list[str] = field(default_factory=list)  # hidden_states versions it was trained on

    @property
    def version(self) -> str:
        return stable_hash(self.identity)

    def exists(self) -> bool:
        return self.path is None or Path(self.path).exists()


@dataclass(frozen=True)
class CodesHandle(Handle):
    """Sparse SAE codes of one dataset partition."""

    kind: ClassVar[str] = "sae_codes"
    path: str
    hidden: dict[str, Any]
    sae: dict[str, Any]

    @property
    def version(self) -> str:
        return Path(self.path).name

    def exists(self) -> bool:
        return (Path(self.path) / "manifest.json").exists()


@dataclass(frozen=True)
class PooledHandle(Handle):
    """Pooled feature matrices (SAE and hidden) of one (target, dataset) partition."""

    kind: ClassVar[str] = "pooled_features"
    sae_dir: str
    hidden_dir: str
    files: dict[str, str]
    width: int
    signed: bool
    neuronpedia_id: str | None
    dataset: dict[str, Any]

    @property
    def data(self) -> DatasetHandle:
        return DatasetHandle._from_dict(self.dataset)

    @property
    def version(self) -> str:
        return stable_hash([Path(self.sae_dir).name, Path(self.hidden_dir).name])

    def exists(self) -> bool:
        return all(Path(p).exists() for p in self.files.values())


@dataclass(frozen=True)
class TableHandle(Handle):
    """Result tables on disk (probes, transfer, conditions) and a key of the inputs they came from."""

    kind: ClassVar[str] = "table"
    paths: list[str]
    inputs: str  # hash of the input versions and the config section that produced them

    @property
    def version(self) -> str:
        return self.inputs

    def exists(self) -> bool:
        return all(Path(p).exists() for p in self.paths)


HANDLES: dict[str, type[Handle]] = {
    h.kind: h for h in (DatasetHandle, HiddenHandle, SaeHandle, CodesHandle, PooledHandle, TableHandle)
}
