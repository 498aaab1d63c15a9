"""Probes on pooled features (logistic, tree, k-sparse) as scikit-learn estimators, their metrics and I/O."""

from mosaic_dag.probes.fit import FitFn, Matrix, ProbeResult, predict
from mosaic_dag.probes.io import load_probe, save_probe
from mosaic_dag.probes.ksparse import DEFAULT_KS, fit_ksparse, select_features
from mosaic_dag.probes.linear import DEFAULT_CS, fit_logistic
from mosaic_dag.probes.metrics import Metrics, evaluate, majority_baseline_f1
from mosaic_dag.probes.tree import DEFAULT_MAX_DEPTHS, DEFAULT_MIN_SAMPLES_LEAF, fit_tree

__all__ = [
    "DEFAULT_CS", "DEFAULT_KS", "DEFAULT_MAX_DEPTHS", "DEFAULT_MIN_SAMPLES_LEAF", "FitFn", "Matrix", "Metrics",
    "ProbeResult", "evaluate", "fit_ksparse", "fit_logistic", "fit_tree", "load_probe", "majority_baseline_f1",
    "predict", "save_probe", "select_features",
]
