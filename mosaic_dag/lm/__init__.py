"""The language model: loading, the forward up to the read-out layers, fused CPU blocks, VLMs."""
