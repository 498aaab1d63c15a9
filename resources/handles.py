"""The IO manager between assets: it stores each partition's handle (a small JSON record), never arrays.

A downstream asset gets exactly the handles of the upstream partitions Dagster maps to it, so the
lineage in the UI is the data flow. A missing upstream partition fails the step at once with one
line naming the asset, the partition and how to materialize it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dagster import ConfigurableIOManager, InputContext, OutputContext

from mosaic_dag.handles import Handle, UpstreamMissing
from mosaic_dag.storage import stable_hash, write_json
from resources.experiment import ExperimentResource


def _partition_name(key: Any) -> str:
    return str(key).replace("|", "__")


class HandleIOManager(ConfigurableIOManager):
    """Handles are records of the instance's materializations, so they live with the instance:
    ``$DAGSTER_HOME/mosaic-handles/<data folder key>/<asset>/<partition>.json`` (beside the data when
    Dagster runs without a home). A fresh instance has none, whatever the data folder holds."""

    experiment: ExperimentResource

    def _file(self, asset: str, partition: Any) -> Path:
        data = self.experiment.load().data_path
        home = os.environ.get("DAGSTER_HOME")
        root = Path(home) / "mosaic-handles" / stable_hash(str(data.resolve())) if home else data / ".mosaic-handles"
        return root / asset / (f"{_partition_name(partition)}.json" if partition is not None else "_.json")

    def handle_output(self, context: OutputContext, obj: Handle) -> None:
        if not isinstance(obj, Handle):
            raise TypeError(f"asset {context.asset_key.to_user_string()} returned {type(obj).__name__}, not a handle")
        partition = context.asset_partition_key if context.has_asset_partitions else None
        path = self._file(context.asset_key.to_user_string(), partition)
        record = {"handle": obj.to_json()}
        if path.exists() and path.read_text() == json.dumps(record, indent=2, sort_keys=True, default=str):
            return  # unchanged (a cache hit): nothing to write
        write_json(path, record)

    def _read(self, asset: str, partition: Any) -> Handle | None:
        path = self._file(asset, partition)
        if not path.exists():
            return None
        handle = Handle.from_json(json.loads(path.read_text())["handle"])
        return handle if handle.exists() else None

    def load_input(self, context: InputContext) -> Any:
        asset = context.asset_key.to_user_string()
        many = bool((context.definition_metadata or {}).get("many"))
        if not context.has_asset_partitions:
            handle = self._read(asset, None)
            if handle is None:
                raise UpstreamMissing(f"asset {asset!r} is not materialized; materialize it first "
                                      "(select it with its downstream assets in the UI, or run `mosaic run`)")
            return handle
        keys = list(context.asset_partition_keys)
        found = {str(k): self._read(asset, k) for k in keys}
        if many:
            return found  # the step decides which of them it needs
        missing = [k for k, h in found.items() if h is None]
        if missing or len(found) != 1:
            raise UpstreamMissing(
                f"asset {asset!r} partition {missing[0] if missing else keys!r} is not materialized; materialize it "
                "first (select it with its downstream assets in the UI, or run `mosaic run`)")
        return next(iter(found.values()))
