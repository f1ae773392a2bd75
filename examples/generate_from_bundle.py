"""Load an edgeq artifact folder and generate text with it: what a receiving team runs first.

    python examples/generate_from_bundle.py out/smollm2-135m-w4a16 "The capital of France is"
    python examples/generate_from_bundle.py --genai out/smollm2-135m-w4a16-ort "The capital of France is"

No PyTorch model and no edgeq are needed: the folder holds the ONNX decoder with its KV cache, its
config and its tokenizer. By default it runs with onnxruntime, optimum and transformers; ``--genai``
runs an ``--format ort`` folder with onnxruntime-genai alone, from the folder's genai_config.json.
`edgeq verify DIR` checks the files against manifest.json first.
"""

from __future__ import annotations

import sys


def main(folder: str, prompt: str, new_tokens: int = 32) -> str:
    """The greedy continuation of ``prompt`` (text) with optimum's ORTModelForCausalLM."""
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder)  # CPU; provider="CUDAExecutionProvider" on a GPU
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def generate_genai(folder: str, prompt: str, new_tokens: int = 32) -> str:
    """The greedy continuation of ``prompt`` with onnxruntime-genai (the README's lines). On a GPU,
    og.Config(folder) with append_provider("cuda") replaces the folder in og.Model."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    tokenizer = og.Tokenizer(model)
    tokenizer.update_options(add_special_tokens="true")  # BOS where the model's tokenizer adds it
    prompt_ids = tokenizer.encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens)  # sizes the KV cache
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    return tokenizer.decode(generator.get_sequence(0)[len(prompt_ids) :])


if __name__ == "__main__":
    args = sys.argv[1:]
    run = generate_genai if args[:1] == ["--genai"] else main
    args = args[1:] if run is generate_genai else args
    if not args:
        sys.exit(__doc__)
    print(run(args[0], args[1] if len(args) > 1 else "Once upon a time"))
