"""Probes on pooled features: logistic, decision tree, k-sparse; metrics, I/O, interpretation."""
