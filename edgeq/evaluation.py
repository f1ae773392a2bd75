"""Perplexity of a causal LM on token windows, in PyTorch or in ONNX Runtime."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from tqdm.auto import tqdm

from edgeq.errors import EdgeqError
from exporters.ort_matmulnbits import set_accuracy_level

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids [1, L] -> logits [1, L, vocab]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood. logits [L, vocab], ids [L]."""
    return float(torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean"))


def perplexity(
    logits_fn: LogitsFn, windows: torch.Tensor, desc: str = "perplexity", progress: bool = True
) -> float:
    """exp of the mean next-token NLL over windows [n, L] (each window scored on its own; a BOS
    at its start is context, never a target)."""
    nlls = []
    for ids in tqdm(windows, desc=desc, unit="window", disable=not progress):
        nlls.append(window_nll(logits_fn(ids[None])[0], ids))
    return math.exp(sum(nlls) / len(nlls))


def torch_logits_fn(model) -> LogitsFn:
    @torch.no_grad()
    def run(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids, use_cache=False).logits

    return run


class DecoderLM:
    """A decoder-with-past ONNX model (optimum's layout: input_ids, attention_mask, position_ids,
    past_key_values.i.key / .value in; logits, present.i.key / .value out) behind one runtime:
    what perplexity, validation and the latency timings call. A runtime's subclass opens the model,
    sets ``input_names``, ``input_dtypes`` (name → float numpy type of a float input, None for
    another float type) and ``active_providers``, and implements ``run``.

    The cache is fed in the element type each past input declares (float32, or float16 in a float16
    graph); logits come back as float32 whatever the graph's logits output is.
    """

    FLOAT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    input_names: set[str]
    input_dtypes: dict[str, type | None]

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self.path = self.model_dir / "model.onnx"
        if not self.path.exists():
            raise EdgeqError(f"no model.onnx in {self.model_dir}")
        config = json.loads((self.model_dir / "config.json").read_text())
        self.num_layers = config["num_hidden_layers"]
        self.num_kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
        self.head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        self.vocab_size = config["vocab_size"]

    @property
    def active_providers(self) -> list[str]:
        """The runtimes the model really runs on."""
        raise NotImplementedError

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """The graph's outputs (``outputs``, or all of them) by name for ``feeds``."""
        raise NotImplementedError

    def _past_dtype(self, name: str) -> type:
        dtype = self.input_dtypes.get(name, np.float32)
        if dtype is None:
            raise EdgeqError(f"the graph's input {name} is neither float32 nor float16")
        return dtype

    @staticmethod
    def _float32(array: np.ndarray) -> np.ndarray:
        """float32 logits whatever the graph's output dtype (a float32 array comes back as it is)."""
        return array if array.dtype == np.float32 else array.astype(np.float32)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        """An empty cache [b, kv heads, 0, head dim] per layer, in the dtype each past input declares."""
        shape = (batch, self.num_kv_heads, 0, self.head_dim)
        names = [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]
        return {name: np.zeros(shape, self._past_dtype(name)) for name in names}

    def prefill_feeds(self, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        """The graph's inputs for a fresh prefill of input_ids [b, L] (empty cache)."""
        ids = input_ids.numpy().astype(np.int64)
        feeds = {"input_ids": ids, **self.empty_past(ids.shape[0])}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return feeds

    def step(
        self, input_ids: np.ndarray, past: dict[str, np.ndarray], start: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run input_ids [b, L] at positions start.. on top of the cache ``past``; returns the logits
        [b, L, vocab] and the new cache (as the next call's ``past``)."""
        b, length = input_ids.shape
        feeds = {"input_ids": input_ids.astype(np.int64), **past}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((b, start + length), np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(np.arange(start, start + length), (b, length)).copy()
        outputs = self.run(feeds)
        present = {
            name.replace("present", "past_key_values"): value
            for name, value in outputs.items()
            if name.startswith("present")
        }
        return self._float32(outputs["logits"]), present

    def generate_greedy(self, prompt: np.ndarray, new_tokens: int) -> np.ndarray:
        """Greedy decoding with the KV cache: prompt [1, L] → the new token ids [new_tokens]."""
        logits, past = self.step(prompt, self.empty_past(1), 0)
        tokens = []
        for t in range(new_tokens):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            if t + 1 < new_tokens:
                logits, past = self.step(np.array([[token]]), past, prompt.shape[1] + t)
        return np.array(tokens)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, L] -> logits [b, L, vocab] (a fresh prefill, no cache)."""
        logits = self.run(self.prefill_feeds(input_ids), ["logits"])["logits"]
        return torch.from_numpy(self._float32(logits))


class OrtCausalLM(DecoderLM):
    """The decoder in an ONNX Runtime session on one execution provider.

    accuracy_level: the MatMulNBits accuracy level, whether ORT fuses int4 DequantizeLinear → MatMul
    into MatMulNBits or the graph holds them (0 = float32 compute, exact to the fake-quantized
    weights; 4 = int8 activations, faster; None = as ORT and the graph set it, what a user gets).
    """

    def __init__(
        self,
        model_dir: str | Path,
        provider: str = "CPUExecutionProvider",
        accuracy_level: int | None = 0,
        threads: int | None = None,
    ):
        import onnxruntime as ort

        super().__init__(model_dir)
        model_dir, path = self.model_dir, self.path
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # for DequantizeLinear → MatMul that ORT fuses; explicit MatMulNBits carry it as an attribute
        if accuracy_level is not None:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
        if threads:
            options.intra_op_num_threads = threads
        source: str | bytes = str(path)
        graph = onnx.load(str(path), load_external_data=False)
        if accuracy_level is not None and any(node.op_type == "MatMulNBits" for node in graph.graph.node):
            set_accuracy_level(graph, accuracy_level)
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(model_dir)
            )
            source = graph.SerializeToString()
        if provider == "CUDAExecutionProvider" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA and cuDNN from torch or the nvidia-* wheels (onnxruntime-gpu >= 1.21)
        self.session = ort.InferenceSession(source, options, providers=[provider])
        self.provider = provider
        self.input_names = {i.name for i in self.session.get_inputs()}
        # the cache's element type as the graph declares it: float32, or float16 in a float16 graph
        self.input_dtypes = {i.name: self.FLOAT_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def active_providers(self) -> list[str]:
        """The providers the session really runs on (ORT falls back to the CPU when, say, the CUDA
        provider's libraries fail to load)."""
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        names = outputs or self.output_names
        return dict(zip(names, self.session.run(names, feeds), strict=True))
