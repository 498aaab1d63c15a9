"""Sparse autoencoders: spec, loading, compat, integrity, encode, stats, codes_io (one codes shard), training and
step (sae-lens trainer, sparse TopK step), registry, quality; the steps: resolve (a target's SAE), build (build_sae),
codes (build_codes)."""
