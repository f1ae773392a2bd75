"""compare.py's peer rows: a runner in another venv hands back weights or window NLLs, compare.py scores
them with edgeq's code; the toolkits themselves are stood in for by a fake runner on a tiny model."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, benchmark_module

from edgeq.evaluation import perplexity, torch_logits_fn, window_nll
from edgeq.models.loading import ModelSource, load_model

PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers"

# Stands in for benchmarks/peers/gptqmodel_run.py: "quantizes" by halving every linear's weight, with
# peer_io doing the rest as the real runners do. Recipes: weights (hand back weights and score the
# windows), nll-only (score only, as the W4A4 recipes do), fail (the toolkit raises), die (no result).
FAKE_RUNNER = """
import os, sys
if sys.argv[-1] == "die":
    print("killed by the toolkit"); os._exit(3)
sys.path.insert(0, {peers!r})
import torch
from peer_io import PeerResult, load_windows, parse_args, run, save_weights, score, timed, versions

def body(result, args):
    if args.recipe == "fail":
        raise ValueError("columns not divisible by group_size\\nsecond line")
    from transformers import AutoModelForCausalLM

    calibration, evaluation = load_windows(args.data)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.float32).eval()
    linears = {{n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}}
    timed(result, lambda: [m.weight.data.mul_(0.5) for m in linears.values()])
    result.settings = {{"lm_head": "float", "calibration_shape": list(calibration.shape)}}
    if args.recipe == "weights":
        save_weights(result, args.out, {{f"{{n}}.weight": m.weight for n, m in linears.items()}})
    score(result, model, evaluation)

args = parse_args("fake", ("weights", "nll-only", "fail"))
sys.exit(run(PeerResult("gptqmodel", args.recipe, versions()), args.out, lambda r: body(r, args)))
"""


@pytest.fixture
def fake_peer(tmp_path: Path, monkeypatch):
    """compare.py with its peers folder holding the fake runner, and a 'gptqmodel' venv whose python
    is this one (a wrapper script: a symlink would lose this venv's site-packages)."""
    compare = benchmark_module("compare")
    runners = tmp_path / "runners"
    runners.mkdir()
    (runners / "gptqmodel_run.py").write_text(FAKE_RUNNER.format(peers=str(PEERS)))
    monkeypatch.setattr(compare, "PEERS", runners)
    venv_bin = tmp_path / "venvs" / "gptqmodel" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv_bin / "python").chmod(0o755)
    return compare, tmp_path / "venvs"


def _run(compare, venvs: Path, folder: Path, tmp_path: Path, recipe: str) -> tuple[dict, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    data = SimpleNamespace(
        calibration=torch.randint(0, VOCAB, (2, 16), generator=generator),
        evaluation=torch.randint(0, VOCAB, (3, 16), generator=generator),
    )
    data_file = compare.write_peer_data(data, tmp_path / "peer-data.safetensors")
    row = compare.Row("fake", "Fake", "peer", {"toolkit": "gptqmodel", "recipe": recipe})
    record = compare._new_record(row)
    source = ModelSource(spec=str(folder), path=str(folder))
    compare.run_peer_row(row, record, source, data_file, data.evaluation, tmp_path / "out", venvs)
    return record, data.evaluation


def test_peer_weights_are_scored_by_edgeq_and_agree_with_the_runners_own_forward(
    fake_peer, tiny_model_dir, tmp_path
):
    compare, venvs = fake_peer
    record, windows = _run(compare, venvs, tiny_model_dir, tmp_path, "weights")
    fp = perplexity(
        torch_logits_fn(load_model(ModelSource(str(tiny_model_dir), str(tiny_model_dir)))), windows
    )
    assert record["scored_in"] == "edgeq"
    assert record["settings"]["quantized_linears"] == 2 * 7 and record["settings"]["float_linears"] == []
    assert record["perplexity"] != pytest.approx(fp, rel=1e-3)  # the halved weights were loaded
    # the runner's copy of window_nll over transformers' forward = edgeq's perplexity of the weights
    assert record["peer_perplexity"] == pytest.approx(record["perplexity"], rel=1e-5)
    assert record["quantization_seconds"] > 0 and record["peak_rss_bytes"] > 0
    assert record["lm_head"] == "float"
    assert record["settings"]["peer"]["settings"]["calibration_shape"] == [2, 16]


def test_activation_recipes_take_the_runners_window_nlls(fake_peer, tiny_model_dir, tmp_path):
    compare, venvs = fake_peer
    record, _ = _run(compare, venvs, tiny_model_dir, tmp_path, "nll-only")
    assert record["scored_in"] == "peer"
    assert record["perplexity"] == record["peer_perplexity"]
    nll = json.loads((tmp_path / "out" / "result.json").read_text())["window_nll"]
    assert record["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)))


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("fail", "ValueError: columns not divisible by group_size"),
        ("die", "runner exited with status 3 and no result: killed by the toolkit"),
    ],
)
def test_a_failing_toolkit_is_a_row_with_its_error(fake_peer, tiny_model_dir, tmp_path, recipe, message):
    compare, venvs = fake_peer
    row = compare.Row("fake", "Fake", "peer", {"toolkit": "gptqmodel", "recipe": recipe})
    record = compare._new_record(row)
    data = SimpleNamespace(
        calibration=torch.zeros(1, 4, dtype=torch.long), evaluation=torch.zeros(1, 4, dtype=torch.long)
    )
    data_file = compare.write_peer_data(data, tmp_path / "d.safetensors")
    source = ModelSource(str(tiny_model_dir), str(tiny_model_dir))
    with pytest.raises(compare.PeerError) as raised:
        compare.run_peer_row(row, record, source, data_file, data.evaluation, tmp_path / "out", venvs)
    assert compare._first_line(raised.value) == message  # the row's error, without "PeerError: "
    assert record["log_tail"]  # the runner's last lines stay in the record


def test_a_missing_venv_says_how_to_make_it(tmp_path):
    compare = benchmark_module("compare")
    row = next(r for r in compare.ROWS if r.key == "llmcompressor-w4a4")
    with pytest.raises(compare.PeerError, match="run bash benchmarks/peers/setup.sh"):
        compare.peer_command(row, tmp_path, tmp_path, tmp_path / "d", tmp_path / "o")


def test_peer_weights_must_name_the_models_parameters_with_their_shapes(tiny_model_dir, tmp_path):
    from safetensors.torch import save_file

    compare = benchmark_module("compare")
    model = load_model(ModelSource(str(tiny_model_dir), str(tiny_model_dir)))
    name = "model.layers.0.mlp.down_proj.weight"
    shape = dict(model.named_parameters())[name].shape
    save_file({"model.layers.0.mlp.nonexistent.weight": torch.zeros(shape)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(compare.PeerError, match="unknown parameter"):
        compare.load_peer_weights(model, tmp_path / "a.safetensors")
    save_file({name: torch.zeros(shape[1], shape[0])}, str(tmp_path / "b.safetensors"))
    with pytest.raises(compare.PeerError, match="has shape"):
        compare.load_peer_weights(model, tmp_path / "b.safetensors")


def test_the_runners_window_nll_is_edgeqs():
    sys.path.insert(0, str(PEERS))
    try:
        import peer_io
    finally:
        sys.path.remove(str(PEERS))
    logits, ids = torch.randn(12, VOCAB), torch.randint(0, VOCAB, (12,))
    assert peer_io.window_nll(logits, ids) == window_nll(logits, ids)
    assert textwrap.dedent(peer_io.window_nll.__doc__ or "").startswith("Mean next-token")
