"""Sparse autoencoders: spec, loading, compatibility, encoding, codes on disk, training, registry, health."""
