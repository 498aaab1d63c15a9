"""Dagster assets: each a thin shell over one step of mosaic_dag's library."""
