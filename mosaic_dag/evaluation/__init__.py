"""Sweeps, selection on validation, paired comparisons, transfer, conditions, judge, interventions."""
