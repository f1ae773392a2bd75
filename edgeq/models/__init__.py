"""Model loading and per-architecture adapters."""
