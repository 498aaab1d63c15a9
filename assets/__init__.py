"""Dagster assets: each a thin shell over one step of mosaic_dag's library."""

import warnings

from dagster import BetaWarning, PreviewWarning

# Two Dagster APIs this graph relies on on purpose are still marked beta/preview: explicit data versions
# on outputs (staleness) and partitioned asset checks (one check result per partition). Their warning
# would print once per materialization in the CLI and in every run's logs.
warnings.filterwarnings("ignore", message=r"Parameter `data_version`", category=BetaWarning)
warnings.filterwarnings("ignore", message=r"Specifying a partitions_def on an AssetCheckSpec", category=PreviewWarning)
