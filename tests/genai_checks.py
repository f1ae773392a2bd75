"""Checks of an artifact folder in onnxruntime-genai against edgeq's own ORT decode loop and
transformers' tokenizer, shared by the tiny, real-configuration and SmolLM2 tests."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
from transformers import AutoTokenizer

from edgeq.evaluation import OrtCausalLM
from exporters.genai_config import GENAI_CONFIG_FILE

README = Path(__file__).resolve().parents[1] / "README.md"


def genai_greedy(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """onnxruntime-genai's greedy continuation of ``prompt``: up to ``new_tokens`` ids, fewer when it
    stops at an eos id."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def assert_same_greedy_tokens(folder: Path, prompt: list[int], new_tokens: int) -> list[int]:
    """genai's greedy tokens equal edgeq's decode loop's (at the graph's stored accuracy level, as
    genai runs it) token by token, up to an eos genai stops at; returns them."""
    expected = OrtCausalLM(folder, accuracy_level=None).generate_greedy(np.array([prompt]), new_tokens)
    got = genai_greedy(folder, prompt, new_tokens)
    eos = json.loads((folder / GENAI_CONFIG_FILE).read_text())["model"]["eos_token_id"]
    eos = set(eos if isinstance(eos, list) else [eos])
    assert got == expected[: len(got)].tolist()
    assert len(got) == new_tokens or got[-1] in eos
    return got


def assert_same_tokenization(folder: Path, texts: list[str]) -> None:
    """genai's tokenizer gives the ids transformers' gives from the folder's tokenizer files: without
    special tokens by default (genai's), with them (BOS where the tokenizer adds it) when told."""
    tokenizer, reference = og.Tokenizer(og.Model(str(folder))), AutoTokenizer.from_pretrained(folder)
    for text in texts:
        assert [int(i) for i in tokenizer.encode(text)] == reference(text, add_special_tokens=False).input_ids
    tokenizer.update_options(add_special_tokens="true")
    for text in texts:
        assert [int(i) for i in tokenizer.encode(text)] == reference(text).input_ids, text


def readme_genai_lines() -> str:
    """The Python block of the README's onnxruntime-genai section."""
    readme = README.read_text()
    return re.search(r"```python\n(.*?)```", readme[readme.index("### onnxruntime-genai") :], re.S).group(1)


def assert_readme_lines_run(folder: Path) -> str:
    """Run the README's lines on ``folder`` (its folder literal replaced): they print the prompt and
    the greedy continuation that edgeq's decode loop computes. Returns what they printed."""
    code = readme_genai_lines()
    folder_literal = re.search(r'og\.Model\(("[^"]+")\)', code).group(1)
    prompt = re.search(r'tokenizer\.encode\("([^"]+)"\)', code).group(1)
    max_length = int(re.search(r"max_length=(\d+)", code).group(1))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace(folder_literal, repr(str(folder))), {})  # the README's own lines
    ids = AutoTokenizer.from_pretrained(folder)(prompt).input_ids
    tokens = assert_same_greedy_tokens(folder, ids, max_length - len(ids))
    text = printed.getvalue().removesuffix("\n")  # print's own newline; the text may end in newlines
    assert text == og.Tokenizer(og.Model(str(folder))).decode(ids + tokens)
    assert text.startswith(prompt)
    return text
