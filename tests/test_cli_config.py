"""The CLI's flags land in the ExportConfig serialized into every artifact."""

from __future__ import annotations

from edgeq.cli import build_parser, export_config_from_args
from edgeq.config import SCHEMES, ExportConfig


def _config(*flags: str) -> ExportConfig:
    return export_config_from_args(build_parser().parse_args(["export", *flags]))


def test_defaults_are_the_scheme_preset():
    config = _config()
    assert config.quant == SCHEMES["w4a16"]
    assert config.quant.method == "boa"
    assert config.model == "smollm2-135m"


def test_flags_override_only_what_they_name():
    config = _config(
        "--scheme", "w3a16", "--method", "gptq", "--group-size", "64", "--symmetric", "--no-act-order",
        "--percdamp", "0.05", "--clip-grid", "1", "--row-block", "4", "--relaxed-v", "--alpha", "0.25",
        "--calib-samples", "8", "--eval-windows", "all",
    )  # fmt: skip
    quant = config.quant
    assert (quant.scheme, quant.method) == ("w3a16", "gptq")
    assert (quant.weights.bits, quant.weights.group_size, quant.weights.symmetric) == (3, 64, True)
    assert (quant.gptq.act_order, quant.gptq.percdamp, quant.gptq.clip_grid) == (False, 0.05, 1)
    assert quant.gptq.block_size == SCHEMES["w3a16"].gptq.block_size
    assert (quant.boa.row_block, quant.boa.relaxed_v, quant.boa.alpha) == (4, True, 0.25)
    assert config.calibration.num_sequences == 8 and config.evaluation.max_windows is None
    assert ExportConfig.from_dict(config.to_dict()) == config


def test_w4a4_preset_and_its_overrides():
    config = _config("--scheme", "w4a4")
    quant = config.quant
    assert quant.rotation.enabled and quant.activations.bits == 4 and not quant.activations.symmetric
    assert quant.activations.clip_search and quant.rotation.kind == "hadamard"
    assert (quant.weights.bits, quant.weights.group_size, quant.weights.symmetric) == (4, -1, False)
    assert _config("--scheme", "w4a4", "--symmetric").quant.weights.symmetric
    assert quant.activations.shift  # the shift is on in the preset (benchmarks/w4a4.py)
    assert not _config("--scheme", "w4a4", "--no-act-shift").quant.activations.shift
    assert _config("--scheme", "w4a16", "--act-shift").quant.activations.shift
    assert not quant.activations.compensate_rounding  # off in the preset (see ActQuantConfig)
    assert _config("--scheme", "w4a4", "--act-compensate").quant.activations.compensate_rounding
    assert _config("--scheme", "w4a4", "--kv-bits", "4").quant.activations.kv_shifted  # on in the preset
    assert not _config("--scheme", "w4a4", "--kv-bits", "4", "--no-kv-shift").quant.activations.kv_shifted
    assert not _config("--scheme", "w4a4").quant.activations.kv_shifted  # a float cache has nothing to shift
    assert _config("--scheme", "w4a16", "--kv-bits", "4", "--kv-shift").quant.activations.kv_shifted
    assert quant.rotation.r5  # on in the preset: benchmarks/w4a4.py's "no R5" row measures it
    assert _config("--scheme", "w4a4-down8").quant.rotation.r5
    assert not _config("--scheme", "w4a16", "--rotate").quant.rotation.r5
    assert _config("--scheme", "w4a16", "--rotate", "--r5").quant.rotation.r5
    assert not _config("--scheme", "w4a4", "--no-r5").quant.rotation.r5
    config = _config(
        "--scheme", "w4a4", "--act-symmetric", "--act-clip", "1.0", "--down-act-bits", "8",
        "--no-rotate", "--rotation-seed", "3", "--kv-bits", "4", "--format", "ort",
        "--quantize-embedding", "--quantize-lm-head",
    )  # fmt: skip
    act, rot = config.quant.activations, config.quant.rotation
    assert (act.bits, act.symmetric, act.clip_ratio, act.down_proj_bits) == (4, True, 1.0, 8)
    assert not act.clip_search  # a fixed ratio given
    assert act.bits_for("down") == 8 and act.bits_for("q") == 4
    assert (rot.enabled, rot.seed) == (False, 3)
    assert act.kv_bits == 4 and config.format == "ort"
    assert config.quant.quantize_embedding and config.quant.lm_head_bits == 4  # the weights' own grid
    assert ExportConfig.from_dict(config.to_dict()) == config


def test_lm_head_bits_presets_flags_and_old_configs():
    assert _config("--scheme", "w4a4").quant.lm_head_bits == 8  # every preset: an int8 lm_head
    head = _config("--scheme", "w4a16").quant.lm_head_weights
    assert (head.bits, head.group_size, head.symmetric) == (8, 128, False)  # the weights' group and symmetry
    assert _config("--scheme", "w4a16", "--lm-head-bits", "16").quant.lm_head_weights is None
    assert _config("--scheme", "w3a16", "--quantize-lm-head").quant.lm_head_bits == 3
    old = _config("--scheme", "w4a16").to_dict()
    del old["quant"]["lm_head_bits"]
    old["quant"]["quantize_lm_head"] = True  # an edgeq_config.json written before lm_head_bits
    assert ExportConfig.from_dict(old).quant.lm_head_bits == 4
    del old["quant"]["quantize_lm_head"]
    assert ExportConfig.from_dict(old).quant.lm_head_bits == 16


def test_w4a4_presets_learned_rotations_and_clip_search_from_the_command_line():
    down8, w4a8 = _config("--scheme", "w4a4-down8").quant, _config("--scheme", "w4a8").quant
    assert down8.activations.bits_for("down") == 8 and down8.activations.bits_for("gate") == 4
    assert w4a8.activations.bits == 8 and w4a8.weights == _config("--scheme", "w4a4").quant.weights
    # down8 compensates the rounding where the method can; RTN and OAC then go without it, unasked
    assert down8.activations.compensate_rounding and not w4a8.activations.compensate_rounding
    for method, compensates in (("gptq", True), ("aespa", True), ("rtn", False), ("oac", False)):
        quant = _config("--scheme", "w4a4-down8", "--method", method).quant
        assert quant.activations.compensate_rounding == compensates
    assert not _config("--scheme", "w4a4-down8", "--no-act-compensate").quant.activations.compensate_rounding
    config = _config("--scheme", "w4a16", "--act-bits", "4", "--act-clip", "search", "--rotation", "learned",
                     "--rotation-steps", "5", "--rotation-samples", "3", "--rotation-lr", "0.01",
                     "--rotation-objective-weights", "rtn")  # fmt: skip
    rot = config.quant.rotation
    assert config.quant.activations.clip_search
    assert (rot.enabled, rot.kind, rot.steps, rot.samples, rot.lr) == (True, "learned", 5, 3, 0.01)
    assert rot.objective_weights == "rtn"
    assert _config("--scheme", "w4a4").quant.rotation.objective_weights == "float"
    assert _config("--scheme", "w4a4", "--method", "rtn").quant.rotation.objective_weights == "rtn"
    rtn_float = _config("--scheme", "w4a4", "--method", "rtn", "--rotation-objective-weights", "float")
    assert rtn_float.quant.rotation.objective_weights == "float"
    assert ExportConfig.from_dict(config.to_dict()) == config
