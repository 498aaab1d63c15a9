"""The ``report`` asset: report/index.html + index.md + figures of exactly the config's materialized partitions."""

from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, AssetsDefinition, MetadataValue

from assets.emit import emit, step_asset, versions
from assets.partitions import EVERY, target_dataset_partitions
from mosaic_dag.config import ExperimentConfig
from mosaic_dag.report.build import build_report
from mosaic_dag.handles import TableHandle
from mosaic_dag.keys import DATASET_DIM, TARGET_DIM, dataset_keys, targets
from mosaic_dag.report.markdown import embedded_markdown
from mosaic_dag.storage import stable_hash
from resources import ExperimentResource, MlflowResource


def _files(handles: dict, pattern: str = "") -> list[Path]:  # type: ignore[type-arg]
    return [Path(p) for h in handles.values() if h is not None for p in h.paths if pattern in Path(p).name]


def build(cfg: ExperimentConfig | None) -> list[AssetsDefinition]:
    # opt-in steps (judge, ...) exist only when the config turns them on; the report then reads them too
    optional = [name for name, on in (("judge", cfg is not None and cfg.judge.enabled),
                                      ("task_transfer", cfg is not None and bool(cfg.tasks)),
                                      ("interventions", cfg is not None and cfg.interventions.enabled)) if on]

    @step_asset(
        "report", cfg, partitions_def=None, group="report",
        ins={"probes": AssetIn("probes", partition_mapping=EVERY, metadata={"many": True}),
             "transfer": AssetIn("transfer", partition_mapping=EVERY, metadata={"many": True}),
             "conditions": AssetIn("conditions", partition_mapping=EVERY, metadata={"many": True}),
             **{name: AssetIn(name, partition_mapping=EVERY, metadata={"many": True}) for name in optional}},
        description="report/index.html (self-contained) + index.md + PNG/SVG figures of exactly the config's "
        "materialized partitions: which source wins, effect of layer, SAE, pooling and binarization, transfer "
        "heatmaps, hard conditions; the figures are embedded in this asset's `report` metadata.",
    )
    def report(context: AssetExecutionContext, experiment: ExperimentResource, mlflow: MlflowResource,
               probes: dict, transfer: dict, conditions: dict, **extra: dict):  # type: ignore[no-untyped-def, type-arg]
        cfg = experiment.load()
        # only the config's own partitions: the instance keeps partitions an earlier config registered
        ours_t = {t.key for t in targets(cfg)}
        ours_d = {d.key for d in dataset_keys(cfg)}

        def current(handles: dict, multi: bool) -> dict:  # type: ignore[type-arg]
            if not multi:
                return {k: h for k, h in handles.items() if k in ours_t}
            keys = {k: target_dataset_partitions.get_partition_key_from_str(k).keys_by_dimension for k in handles}
            return {k: h for k, h in handles.items() if keys[k][TARGET_DIM] in ours_t and keys[k][DATASET_DIM] in ours_d}

        probes, conditions, transfer = current(probes, True), current(conditions, True), current(transfer, False)
        extra = {name: current(handles, name != "task_transfer") for name, handles in extra.items()}
        missing = sorted(k for k, h in probes.items() if h is None)
        if missing:
            context.log.warning(f"report: probes not materialized for {missing}; the report leaves them out")
        with mlflow.run(context, cfg) as run:
            judged = [p for p in _files(extra.get("judge", {})) if p.parent.parent.name == "results"]
            rep = build_report(cfg, results=_files(probes) + _files(transfer, "transfer.") + judged,
                               transfer=_files(transfer, "transfer-matrix.") + _files(extra.get("task_transfer", {}),
                                                                                      "transfer-matrix."),
                               conditions=_files(conditions), interventions=_files(extra.get("interventions", {})))
            run.log_artifact(rep.index, "report")
            if rep.html is not None:
                run.log_artifact(rep.html, "report")
            for fig in [*rep.pngs, *rep.svgs]:
                run.log_artifact(fig, "report")
        inputs = stable_hash([versions(probes), versions(transfer), versions(conditions)]
                             + [versions(h) for _, h in sorted(extra.items())])
        return emit(TableHandle(paths=[str(rep.index)], inputs=inputs), {
            "index": MetadataValue.path(str(rep.index)),
            "html": MetadataValue.path(str(rep.html)),
            "skipped": MetadataValue.json(rep.skipped),
            "report": MetadataValue.md(embedded_markdown(rep.index)),
            "missing_partitions": MetadataValue.json(missing),
        }, run)

    return [report]
