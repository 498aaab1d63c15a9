"""The asset graph is the data flow: steps read their upstream's handles, data versions drive staleness,
sensors only add partitions and automation does the rest — all checked the way Dagster evaluates them."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from dagster import (
    AssetKey,
    DagsterInstance,
    MultiPartitionKey,
    build_sensor_context,
    evaluate_automation_conditions,
    materialize,
)

from mosaic_dag.config import load_config
from mosaic_dag.definitions import build_assets, build_definitions, resources
from mosaic_dag.runner import register_partitions, run_experiment
from tests.support.models import fast_config, tiny_config, two_dataset_config


def _stale(instance: DagsterInstance, config: Path) -> dict[tuple[str, str], str]:
    """Dagster's own stale status of every asset partition of the config (what the UI shows)."""
    from dagster._utils.test.data_versions import get_stale_status_resolver

    cfg = load_config(config)
    assets = build_assets(cfg)
    resolver = get_stale_status_resolver(instance, assets)
    out = {}
    for a in assets:
        pdef = a.partitions_def
        keys = [None] if pdef is None else pdef.get_partition_keys(dynamic_partitions_store=instance)
        for key in keys:
            out[(a.key.to_user_string(), str(key))] = resolver.get_status(a.key, key).value
    return out


def test_a_step_alone_on_a_fresh_instance_names_its_missing_upstream_and_computes_nothing(
        tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    config = tiny_config(tmp_path, tiny_model_dir, layers=[1])
    cfg = load_config(config)
    instance = DagsterInstance.get()
    register_partitions(instance, cfg)
    res = resources(config)
    result = materialize(build_assets(cfg), selection=["probes"], instance=instance, resources=res,
                         partition_key=str(MultiPartitionKey({"target": "tiny.L1.btk", "dataset": "toy.en"})),
                         raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].event_specific_data.error
    message = failure.cause.message if failure.cause else failure.message
    import re

    assert re.search(r"asset '(pooled_features|dataset)' partition '[^']+' is not materialized; materialize it", message)
    assert len(message.strip().splitlines()) == 1
    assert not (tmp_path / "data" / "hidden").exists()  # no forward pass, no SAE, no codes
    assert not (tmp_path / "data" / "saes").exists()


def test_every_step_is_its_own_materialization_and_reads_its_upstream(tmp_path: Path, tiny_model_dir: Path,
                                                                       dagster_home: Path):
    config = fast_config(tmp_path, tiny_model_dir, layers=[1])
    summary = run_experiment(config, progress=False, echo=lambda *_: None)
    instance = DagsterInstance.get()
    for asset in ("dataset", "hidden_states", "sae", "sae_codes", "pooled_features", "probes", "conditions",
                  "transfer", "report"):
        event = instance.get_latest_materialization_event(AssetKey(asset))
        assert event is not None, asset
        assert event.asset_materialization.tags.get("dagster/data_version"), asset  # every asset has a version
    assert summary.forward_calls() > 0
    # nothing is stale right after a full run
    assert set(_stale(instance, config).values()) == {"FRESH"}


def test_editing_one_dataset_marks_exactly_its_downstream_stale(tmp_path: Path, tiny_model_dir: Path,
                                                                 dagster_home: Path):
    config = two_dataset_config(tmp_path, tiny_model_dir, train_on=["other"])
    run_experiment(config, progress=False, echo=lambda *_: None)
    instance = DagsterInstance.get()
    csv = tmp_path / "toy.csv"
    frame = pd.read_csv(csv)
    frame.loc[0, "message"] = "a completely new text here"
    frame.to_csv(csv, index=False)
    cfg = load_config(config)
    res = resources(config)
    assert materialize(build_assets(cfg), selection=["dataset"], partition_key="toy.en", instance=instance,
                       resources=res).success
    status = _stale(instance, config)
    stale = {k for k, v in status.items() if v == "STALE"}
    toy = "toy.en|tiny.L1.btk"
    downstream_of_toy = {("hidden_states", "toy.en"), ("sae_codes", toy), ("pooled_features", toy), ("probes", toy),
                         ("conditions", toy), ("transfer", "tiny.L1.btk"), ("report", "None")}
    # Dagster marks the direct readers of the new data stale (the rest follow once those re-materialize)
    assert {("hidden_states", "toy.en"), ("probes", toy), ("conditions", toy)} <= stale <= downstream_of_toy
    other = {k for k in status if "other.en" in k[1]} | {("sae", "tiny.L1.btk"), ("dataset", "toy.en")}
    assert all(status[k] == "FRESH" for k in other), {k: status[k] for k in other}


def test_a_new_language_the_sae_does_not_train_on_changes_nothing_upstream_of_it(
        tmp_path: Path, tiny_model_dir: Path, dagster_home: Path):
    config = two_dataset_config(tmp_path, tiny_model_dir, train_on=["toy"], extra=False)
    run_experiment(config, progress=False, echo=lambda *_: None)
    instance = DagsterInstance.get()

    def sae_version() -> str:
        event = instance.get_latest_materialization_event(AssetKey("sae"))
        return event.asset_materialization.tags["dagster/data_version"]

    before = sae_version()
    config = two_dataset_config(tmp_path, tiny_model_dir, train_on=["toy"], extra=True)  # adds other.en
    summary = run_experiment(config, progress=False, echo=lambda *_: None)
    sae_steps = [s for s in summary.steps if s.asset == "sae"]
    assert sae_steps and all(s.metadata["cache_hit"] for s in sae_steps)  # not retrained
    assert sae_version() == before
    assert len(list((tmp_path / "data" / "saes").rglob("cfg.json"))) == 1


def _registry(path: Path, entries: list[str]) -> Path:
    data = {"my-release": {"model": "google/gemma-3-270m", "repo_id": "org/repo", "conversion_func": "gemma_3",
                           "saes": [{"id": sid, "path": f"resid_post/{sid}"} for sid in entries]}}
    path.write_text(yaml.safe_dump(data))
    return path


def test_release_sensor_ticks_add_partitions_and_automation_requests_the_runs(
        tmp_path: Path, dagster_home: Path, monkeypatch: pytest.MonkeyPatch):
    """Sensors evaluated as the daemon evaluates them (``evaluate_tick`` on the repository), then the
    automation conditions evaluated by Dagster: the new SAE partition is requested, a second tick adds nothing."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "data"),
        "models": [{"name": "g", "id": "google/gemma-3-270m", "layers": [5, 9],
                    "saes": [{"origin": "registry", "release": "my-release", "sae_id": "layer_5_width_16k_l0_small",
                              "name": "known"}]}],
        "datasets": [{"name": "d", "path": "x.csv"}, {"name": "e", "path": "y.csv", "language": "fr"}],
    }))
    monkeypatch.setenv("MOSAIC_CONFIG", str(config))
    reg = _registry(tmp_path / "reg.yaml", ["layer_5_width_16k_l0_medium",
                                             "layer_7_width_16k_l0_medium",  # layer not configured
                                             "layer_9_width_1m_l0_medium"])  # too wide by default
    defs = build_definitions(load_config(config), registry_path=reg)
    repo = defs.get_repository_def()
    instance = DagsterInstance.get()

    def tick(name: str, cursor: str | None):
        sensor = repo.get_sensor_def(name)
        data = sensor.evaluate_tick(build_sensor_context(instance=instance, cursor=cursor, repository_def=repo))
        for req in data.dynamic_partitions_requests or []:  # what the daemon does with the result
            instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys))
        return data

    initial = evaluate_automation_conditions(defs=defs, instance=instance)  # the daemon was already running
    added = tick("config_partitions_sensor", None)
    assert not added.run_requests
    assert sorted(instance.get_dynamic_partitions("dataset")) == ["d.en", "e.fr"]
    assert tick("config_partitions_sensor", None).skip_message == "partitions up to date"

    first = tick("new_sae_release_sensor", None)
    assert not first.run_requests  # the sensor only adds partitions
    new = "g.L5.my-release-layer_5_width_16k_l0_medium"
    assert new in instance.get_dynamic_partitions("target")
    assert not [k for k in instance.get_dynamic_partitions("target") if "layer_7" in k or "1m" in k]
    second = tick("new_sae_release_sensor", first.cursor)
    assert not second.run_requests and second.skip_message

    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=initial.cursor)
    assert new in {str(k) for k in result.get_requested_partitions(AssetKey("sae"))}
    assert {str(k) for k in result.get_requested_partitions(AssetKey("dataset"))} == {"d.en", "e.fr"}
    assert not result.get_requested_partitions(AssetKey("sae_codes"))  # its upstream is not there yet: it waits
    again = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert new not in {str(k) for k in again.get_requested_partitions(AssetKey("sae"))}  # requested once
    assert {s.name for s in repo.sensor_defs} == {"config_partitions_sensor", "new_sae_release_sensor",
                                                  "mosaic_automation"}
    assert not repo.schedule_defs  # the weekly refresh is the dataset asset's cron condition
