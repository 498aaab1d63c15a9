"""Dagster resources: thin, configurable shells over mosaic_dag's library functions."""

from resources.experiment import ExperimentResource
from resources.mlflow import MlflowResource
from resources.model import ModelResource
from resources.sae import SaeResource

__all__ = ["ExperimentResource", "MlflowResource", "ModelResource", "SaeResource"]
