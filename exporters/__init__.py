"""Deployable graphs from a quantized model, one module per target format."""
