"""The artifact in OpenVINO's CPU runtime (``openvino.Core``, not ONNX Runtime's OpenVINO provider):
the second consumer of the ``qdq`` graph, behind the same interface as ``OrtCausalLM``.

openvino is an optional extra (``pip install edgeq[openvino]``) and is imported only when a model
is opened here. Its ONNX frontend converts the graph into OpenVINO's own operations when the model
is read; a construct it cannot convert fails there, and ``read_failures`` pulls the frontend's
reasons out of its long message (see ``exporters/openvino_form.py`` for the two it rejects in the
standard ``qdq`` graph, and the form it reads).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.evaluation import DecoderLM

OPENVINO_CPU = "OpenVINO CPU"  # the provider's name in reports (``--providers openvino``)
INSTALL_HINT = "pip install 'edgeq[openvino]'"
# Compile settings by name, the report's keys beside ORT's accuracy levels. "f32_exact": float32
# compute and no dynamic quantization of the activations feeding int4/int8 weights, exact to the
# fake-quantized model like ORT's accuracy level 0. "cpu_defaults": the CPU plugin's own choices,
# what a receiving team gets: on CPUs with VNNI or AMX it quantizes those activations to int8 per
# group of 32 on the fly (like ORT's accuracy level 4), and it computes in bfloat16 where the CPU
# has AMX.
PRECISIONS: dict[str, dict[str, str]] = {
    "f32_exact": {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "cpu_defaults": {},
}


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (None when the package is installed)."""
    if importlib.util.find_spec("openvino") is None:
        return f"the openvino package is not installed ({INSTALL_HINT})"
    return None


def read_failures(message: str) -> list[str]:
    """The ONNX frontend's reasons in the message of a failed ``read_model``, one per operator it
    could not convert (it reports the first failing node of each): the operator, the node and the
    frontend's sentence, e.g. "DequantizeLinear-21 on 'onnx::MatMul_733': DequantizeLinear doesn't
    support case when dimension of X at axis 0 (576) cannot be divided by block_size (128)". The
    message's first line when it holds none."""
    reasons = []
    for block in message.split("\n-- ")[1:]:
        operator, found, body = block.partition(" with a message:")
        if not found:  # the summary
            continue
        body = body.split("\nSummary:")[0]
        node = re.search(r"<Node\(\w+\): ([^>]*)>", body)
        sentences = [line.strip() for line in body.splitlines() if line.strip() and not _NOISE.match(line)]
        where = f" on '{node.group(1)}'" if node else ""
        reasons.append(f"{operator.strip()}{where}: {sentences[-1] if sentences else 'no reason given'}")
    return reasons or [message.strip().splitlines()[0] if message.strip() else "unknown error"]


# the lines of a frontend failure that say where in OpenVINO's sources it was raised, not why
_NOISE = re.compile(r"\s*(While validating|FrontEnd API failed|Check '|Exception from)")


class OpenVinoCausalLM(DecoderLM):
    """The decoder compiled by OpenVINO for its CPU plugin (``precision``: a key of PRECISIONS).

    A graph the ONNX frontend cannot convert raises EdgeqError naming the constructs it rejected.
    """

    def __init__(self, model_dir: str | Path, precision: str = "f32_exact", threads: int | None = None):
        super().__init__(model_dir)
        if precision not in PRECISIONS:
            raise EdgeqError(f"unknown OpenVINO precision '{precision}': choose from {', '.join(PRECISIONS)}")
        missing = openvino_missing()
        if missing:
            raise EdgeqError(f"cannot run {self.path} in OpenVINO: {missing}")
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
        except RuntimeError as err:
            reasons = "; ".join(read_failures(str(err)))
            raise EdgeqError(
                f"OpenVINO {ov.__version__.split('-')[0]} cannot read {self.path.name}: {reasons} "
                "(edgeq export --qdq-form openvino writes the qdq graph in a form it reads)"
            ) from None
        config = dict(PRECISIONS[precision])
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        self.compiled = core.compile_model(model, "CPU", config)
        self.precision = precision
        self.input_names = {port.get_any_name() for port in self.compiled.inputs}
        self.input_dtypes = {
            port.get_any_name(): _FLOAT_DTYPES.get(port.get_element_type().get_type_name())
            for port in self.compiled.inputs
        }
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    @property
    def active_providers(self) -> list[str]:
        return [OPENVINO_CPU]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        """One inference; the outputs are copied out of the request's buffers, which the next
        inference reuses."""
        results = self.request.infer(feeds)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return {name: np.array(by_name[name]) for name in outputs or self.output_names}


# OpenVINO element type name → the numpy type the cache is fed in (None: another float type)
_FLOAT_DTYPES: dict[str, type] = {"f32": np.float32, "f16": np.float16}
