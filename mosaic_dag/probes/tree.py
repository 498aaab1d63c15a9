"""Decision-tree probe: balanced tree, depth and leaf size picked by validation macro-F1, refit on train+validation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy.typing as npt
from sklearn.metrics import f1_score
from sklearn.tree import DecisionTreeClassifier

from mosaic_dag.probes.fit import Choice, FitRows, Matrix, ProbeResult, cv_macro_f1, fit_probe

DEFAULT_MAX_DEPTHS: tuple[int | None, ...] = (2, 4, 8, 16, None)
DEFAULT_MIN_SAMPLES_LEAF: tuple[int, ...] = (1, 5, 20)

__all__ = ["DEFAULT_MAX_DEPTHS", "DEFAULT_MIN_SAMPLES_LEAF", "fit_tree"]


def _tree(depth: int | None, leaf: int, seed: int) -> DecisionTreeClassifier:
    return DecisionTreeClassifier(max_depth=depth, min_samples_leaf=leaf, class_weight="balanced", random_state=seed)


def fit_tree(X_train: Matrix, y_train: npt.ArrayLike, X_validation: Matrix, y_validation: npt.ArrayLike,
             X_test: Matrix, y_test: npt.ArrayLike, *, max_depths: Sequence[int | None] = DEFAULT_MAX_DEPTHS,
             min_samples_leafs: Sequence[int] = DEFAULT_MIN_SAMPLES_LEAF, seed: int = 0, n_boot: int = 1000,
             n_splits: int = 5) -> ProbeResult:
    """Balanced decision tree; grid point picked by validation macro-F1, refit on train+validation.

    Ties keep the earlier grid point (shallower trees come first in the default grid).
    """

    def choose(rows: FitRows) -> Choice:
        best: tuple[float, int | None, int] | None = None
        for depth in max_depths:
            for leaf in min_samples_leafs:
                tree = _tree(depth, leaf, seed).fit(rows.X_train, rows.y_train)
                score = float(f1_score(rows.y_validation, tree.predict(rows.X_validation), average="macro", zero_division=0))
                if best is None or score > best[0]:
                    best = (score, depth, leaf)
        if best is None:
            raise ValueError("max_depths/min_samples_leafs: the grid is empty")
        score, depth, leaf = best
        estimator = _tree(depth, leaf, seed)
        validation_f1 = cv_macro_f1(estimator, rows.X_fit, rows.y_fit, n_splits=n_splits, seed=seed)
        estimator.fit(rows.X_fit, rows.y_fit)
        return Choice(estimator, {"max_depth": depth, "min_samples_leaf": int(leaf)}, score, validation_f1)

    rows = FitRows.of(X_train, y_train, X_validation, y_validation, X_test, y_test)
    return fit_probe("tree", choose, rows, seed=seed, n_boot=n_boot)
