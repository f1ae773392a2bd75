"""Quantize a causal LM with BoA from Python and export it to int4 QDQ ONNX — what `edgeq export` does,
minus the checks and the report.

    python examples/quantize_in_python.py [MODEL] [OUT_DIR]
"""

import sys
from pathlib import Path

from edgeq.config import CalibrationConfig, EvalConfig, QuantConfig, WeightQuantConfig
from edgeq.data import prepare_text_data
from edgeq.evaluation import OrtCausalLM, perplexity
from edgeq.models.adapters import adapter_for
from edgeq.models.loading import load_model, load_tokenizer, resolve_model
from edgeq.pipeline import quantize_model
from exporters import export_onnx

model_spec = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
out = Path(sys.argv[2] if len(sys.argv) > 2 else "out/example-w4a16-boa")

source = resolve_model(model_spec)
tokenizer = load_tokenizer(source)
data = prepare_text_data(tokenizer, CalibrationConfig(num_sequences=16), EvalConfig(max_windows=8))
model = load_model(source)
adapter = adapter_for(model)

config = QuantConfig(method="boa", weights=WeightQuantConfig(bits=4, group_size=128))
result = quantize_model(model, adapter, config, data.calibration)

out.mkdir(parents=True, exist_ok=True)
tokenizer.save_pretrained(out)
export_onnx(model, adapter, result, out, "qdq")  # or "ort": ONNX Runtime's fused operators
print(f"ONNX perplexity: {perplexity(OrtCausalLM(out).logits, data.evaluation):.2f} -> {out}")
