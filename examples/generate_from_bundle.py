"""Load an edgeq artifact folder and generate text with it: what a receiving team runs first.

    python examples/generate_from_bundle.py out/smollm2-135m-w4a16 "The capital of France is"

Only onnxruntime, optimum and transformers are needed (no PyTorch model, no edgeq): the folder holds
the ONNX decoder with its KV cache, its config and its tokenizer. `edgeq verify DIR` checks the files
against manifest.json first.
"""

from __future__ import annotations

import sys

from optimum.onnxruntime import ORTModelForCausalLM
from transformers import AutoTokenizer


def main(folder: str, prompt: str, new_tokens: int = 32) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder)  # CPU; provider="CUDAExecutionProvider" on a GPU
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "Once upon a time"))
