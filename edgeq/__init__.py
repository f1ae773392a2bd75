"""edgeq: 4-bit post-training quantization of causal LMs, exported to ONNX with proof of accuracy."""

__version__ = "0.1.0"
