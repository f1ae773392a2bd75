"""onnxruntime-genai's files beside the ``ort`` format's graph: ``genai_config.json``, and tokenizer
files that its tokenizer reads as transformers does.

``og.Model(folder)`` runs a decoder-only ONNX graph as ``genai_config.json`` describes it: the model
type, token ids and context length; the decoder's file, attention geometry and the names of its
inputs and outputs; the search defaults. Its tokenizer (onnxruntime-extensions) reads tokenizer.json
and tokenizer_config.json from the same folder.

Both graphs of the ort format run there, token for token as edgeq's own decode loop
(``tests/test_genai.py``):

- the fused graph (``ort_fused``: input_ids, attention_mask, past_key_values.N.key/value → logits,
  present.N.key/value; no position_ids, GroupQueryAttention takes the positions from the mask).
  GroupQueryAttention reads the valid cache length from the mask, so genai may keep past and present
  in one buffer of ``max_length`` positions (``past_present_share_buffer``, as ORT's model builder
  sets it for its GroupQueryAttention graphs): no copy of the cache at every step;
- optimum's graph (where the fused one cannot express the model): position_ids as well, and the
  cache grown by Concat, whose output is one step longer than its input: separate buffers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import onnx
from transformers import PretrainedConfig

from edgeq.models.adapters import Adapter
from exporters.onnx_qdq import MODEL_FILE

GENAI_CONFIG_FILE = "genai_config.json"
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
# genai's search options that a model's generation_config.json may set, with genai's defaults
SEARCH_DEFAULTS = {"do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0,
                   "repetition_penalty": 1.0}  # fmt: skip
# transformers' GGUF converter writes a byte-level BPE (SmolLM2's, Llama-3's) as a LlamaTokenizer whose
# decoder runs SentencePiece steps before the ByteLevel one. transformers decodes the same without them
# (a byte-level vocabulary holds no "▁" and no <0x..> byte tokens), but onnxruntime-extensions takes the
# class name and a "▁" Replace step for a SentencePiece model and maps every space to "▁": id -1.
SENTENCEPIECE_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
SENTENCEPIECE_DECODE_STEPS = ("ByteFallback", "Fuse", "Replace")
NEUTRAL_CLASS = "PreTrainedTokenizerFast"  # tokenizer.json as it is, for both readers


def graph_io(model_path: Path) -> tuple[list[str], list[str], int]:
    """The graph's input names, output names and number of GroupQueryAttention nodes (weights not
    loaded)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    attention = sum(node.op_type == "GroupQueryAttention" for node in graph.node)
    return [i.name for i in graph.input], [o.name for o in graph.output], attention


def decoder_io(inputs: list[str], outputs: list[str], layers: int) -> tuple[dict[str, str], dict[str, str]]:
    """genai's ``decoder.inputs`` and ``decoder.outputs``: each name the graph has, the cache as
    %d patterns over its ``layers`` layers. A graph lacking a name genai needs is a writer's bug."""
    past = [p % i for i in range(layers) for p in (PAST_KEY, PAST_VALUE)]
    present = [p % i for i in range(layers) for p in (PRESENT_KEY, PRESENT_VALUE)]
    needed_in, needed_out = ["input_ids", "attention_mask", *past], ["logits", *present]
    missing = [n for n in needed_in if n not in inputs] + [n for n in needed_out if n not in outputs]
    if missing:
        raise ValueError(f"the decoder graph lacks what onnxruntime-genai reads: {', '.join(missing[:4])}")
    names = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in inputs:
        names["position_ids"] = "position_ids"
    names |= {"past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    return names, {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE}


def _first_set(key: str, *sources: dict[str, Any]) -> Any:
    """``key``'s value in the first source that sets it (not None), else None."""
    return next((s[key] for s in sources if s.get(key) is not None), None)


def token_ids(config: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad ids for genai, generation_config.json's before config.json's (as generate reads
    them); pad falls back to the first eos, as ORT's model builder does. An id neither sets is left
    out (genai's default)."""
    eos = _first_set("eos_token_id", generation, config)
    pad = _first_set("pad_token_id", generation, config)
    first_eos = (eos or [None])[0] if isinstance(eos, list) else eos
    ids = {
        "bos_token_id": _first_set("bos_token_id", generation, config),
        "eos_token_id": eos,
        "pad_token_id": first_eos if pad is None else pad,
    }
    return {k: v for k, v in ids.items() if v is not None}


def search_options(generation: dict[str, Any], max_length: int, share_buffer: bool) -> dict[str, Any]:
    """genai's ``search``: the model's generation defaults where generation_config.json sets them,
    genai's otherwise; max_length (prompt and new tokens) the context length, as ORT's builder sets it."""
    options = {key: _first_set(key, generation) for key in SEARCH_DEFAULTS}
    options = {key: SEARCH_DEFAULTS[key] if value is None else value for key, value in options.items()}
    return options | {"max_length": max_length, "min_length": 0, "past_present_share_buffer": share_buffer}


def genai_config(
    config: PretrainedConfig, adapter: Adapter, generation: dict[str, Any], inputs: list[str],
    outputs: list[str], share_buffer: bool,
) -> dict[str, Any]:  # fmt: skip
    """The content of genai_config.json for the decoder graph with ``inputs`` and ``outputs`` of the
    model ``config`` describes (``adapter``: its architecture, which must have a genai type)."""
    genai_type = adapter.genai_type(config)
    if genai_type is None:
        raise ValueError(f"onnxruntime-genai has no model type for {config.model_type}")
    shape = adapter.attention_shape(config)
    layers = config.num_hidden_layers
    decoder_inputs, decoder_outputs = decoder_io(inputs, outputs, layers)
    context = int(config.max_position_embeddings)
    return {
        "model": {
            "type": genai_type,
            **token_ids(config.to_dict(), generation),
            "vocab_size": config.vocab_size,
            "context_length": context,
            "decoder": {
                "filename": MODEL_FILE,
                "session_options": {"log_id": "edgeq", "provider_options": []},
                "hidden_size": shape.hidden_size,
                "head_size": shape.head_dim,
                "num_attention_heads": shape.num_heads,
                "num_key_value_heads": shape.num_kv_heads,
                "num_hidden_layers": layers,
                "inputs": decoder_inputs,
                "outputs": decoder_outputs,
            },
        },
        "search": search_options(generation, context, share_buffer),
    }


def _is_byte_level(tokenizer: dict[str, Any]) -> bool:
    """Whether tokenizer.json's pre-tokenizer is GPT-2's ByteLevel (alone or in a Sequence)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(step.get("type") == "ByteLevel" for step in steps)


def tokenizer_fixes(
    tokenizer: dict[str, Any], tokenizer_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """(tokenizer.json, tokenizer_config.json, what changed) with a byte-level BPE declared as a
    SentencePiece Llama tokenizer (see ``SENTENCEPIECE_CLASSES``) declared as what it is: the generic
    fast tokenizer class, the ByteLevel decoder alone. Anything else is returned unchanged."""
    changes: list[str] = []
    if not _is_byte_level(tokenizer):
        return tokenizer, tokenizer_config, changes
    tokenizer, tokenizer_config = dict(tokenizer), dict(tokenizer_config)
    decoder = tokenizer.get("decoder") or {}
    steps = decoder.get("decoders", []) if decoder.get("type") == "Sequence" else []
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    extra = [s.get("type") for s in steps if s.get("type") != "ByteLevel"]
    if len(byte_level) == 1 and extra and set(extra) <= set(SENTENCEPIECE_DECODE_STEPS):
        tokenizer["decoder"] = byte_level[0]
        changes.append(f"tokenizer.json: decoder {' + '.join(extra)} + ByteLevel → ByteLevel")
    old_class = tokenizer_config.get("tokenizer_class")
    if old_class in SENTENCEPIECE_CLASSES:
        tokenizer_config["tokenizer_class"] = NEUTRAL_CLASS
        changes.append(f"tokenizer_config.json: tokenizer_class {old_class} → {NEUTRAL_CLASS}")
    return tokenizer, tokenizer_config, changes


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_genai_files(folder: Path, config: PretrainedConfig, adapter: Adapter) -> dict[str, Any]:
    """Write genai_config.json beside ``folder``'s model.onnx (and its config and generation config,
    already written) and fix the tokenizer files for genai's reader where needed; returns what was
    done, for report.json. A model without a genai type gets no config, and the reason."""
    if adapter.genai_type(config) is None:
        return {"config": None, "reason": f"onnxruntime-genai has no model type for {config.model_type}"}
    inputs, outputs, attention_nodes = graph_io(folder / MODEL_FILE)
    share_buffer = attention_nodes == config.num_hidden_layers  # every layer's cache read as a buffer
    generation = _read_json(folder / "generation_config.json")
    content = genai_config(config, adapter, generation, inputs, outputs, share_buffer)
    _write_json(folder / GENAI_CONFIG_FILE, content)
    changes: list[str] = []
    tokenizer_path, tokenizer_config_path = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer, tokenizer_config, changes = tokenizer_fixes(
            _read_json(tokenizer_path), _read_json(tokenizer_config_path)
        )
        for path, fixed in ((tokenizer_path, tokenizer), (tokenizer_config_path, tokenizer_config)):
            if any(change.startswith(path.name) for change in changes):
                _write_json(path, fixed)
    return {
        "config": GENAI_CONFIG_FILE,
        "type": content["model"]["type"],
        "past_present_share_buffer": share_buffer,
        "decoder_inputs": sorted(content["model"]["decoder"]["inputs"]),
        "tokenizer_changes": changes,
    }
