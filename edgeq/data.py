"""Calibration and evaluation text.

Evaluation follows the GPTQ/QuaRot/BoA papers: the WikiText-2 raw test split joined into one string
(see ``wikitext2_test_string``), tokenized without special tokens, cut into non-overlapping windows.
Calibration samples random token windows from documents (C4 parquet, JSON lines or plain text).

Both follow the model's BOS convention (``bos_convention``). Models trained with BOS at the start of
every sequence (Gemma, Llama-3) see it at the start of every window: the window is BOS and the next
L - 1 text tokens, and the windows still tile the text without overlap. Models without one (SmolLM2,
Qwen2) get the papers' protocol unchanged: L text tokens, no BOS.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeq.config import CalibrationConfig, EvalConfig
from edgeq.errors import EdgeqError, first_line
from edgeq.models.adapters import Adapter

C4_SAMPLE = "c4-sample/c4_validation_docs0-999.parquet"
WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"


def data_dir() -> Path:
    """The folder holding the text data: ``$EDGEQ_DATA_DIR``, else ``./data``, else ``../shared/data``
    next to the working directory or to this checkout."""
    env = os.environ.get("EDGEQ_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[1]
    for candidate in (Path("data"), Path("../shared/data"), repo / "data", repo.parent / "shared" / "data"):
        if (candidate / WIKITEXT2_TEST).exists() or (candidate / C4_SAMPLE).exists():
            return candidate.resolve()
    raise EdgeqError("no text data folder found: set EDGEQ_DATA_DIR, or pass --calib and --eval-text files")


def default_file(relative: str) -> Path:
    path = data_dir() / relative
    if not path.exists():
        raise EdgeqError(f"{path} does not exist: set EDGEQ_DATA_DIR to the folder holding {relative}")
    return path


def wikitext2_test_string(path: str | Path | None = None) -> str:
    """The evaluation string of the papers, built from ``wiki.test.raw`` exactly as the data README says."""
    path = Path(path) if path else default_file(WIKITEXT2_TEST)
    if not path.exists():
        raise EdgeqError(f"evaluation text not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    rows = ["" if not line.strip() else line + "\n" for line in lines]
    return "\n\n".join(rows)


@dataclass(frozen=True)
class BosConvention:
    """Whether every window starts with BOS (``token_id``; None: no BOS) and who says so."""

    token_id: int | None
    source: str  # "adapter" (an architecture fact) or "tokenizer" (what it adds by default)

    def describe(self) -> str:
        if self.token_id is None:
            return f"no BOS (the {self.source}'s convention)"
        return f"BOS (id {self.token_id}) at the start of every window (the {self.source}'s convention)"

    def to_dict(self) -> dict:
        return {"bos_token_id": self.token_id, "source": self.source, "description": self.describe()}


def bos_convention(tokenizer, adapter: Adapter | None = None) -> BosConvention:
    """The model's BOS convention: the adapter's when the architecture declares one (Gemma is trained
    with BOS whatever a converted tokenizer says), else whether the tokenizer puts its BOS token in
    front of a text when asked for its special tokens (Llama-3 does, SmolLM2 and Qwen2 do not)."""
    bos_id = tokenizer.bos_token_id
    if adapter is not None and adapter.bos is not None:
        if adapter.bos and bos_id is None:
            raise EdgeqError(
                f"{adapter.name} models start every sequence with BOS, but the tokenizer has none"
            )
        return BosConvention(bos_id if adapter.bos else None, "adapter")
    plain = tokenizer("a", add_special_tokens=False).input_ids
    special = tokenizer("a", add_special_tokens=True).input_ids
    adds = bos_id is not None and special[: len(special) - len(plain)][:1] == [bos_id]
    return BosConvention(bos_id if adds else None, "tokenizer")


def _with_bos(windows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """windows [n, L] → [n, L + 1] with bos_id in front (unchanged when there is no BOS)."""
    if bos_id is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos_id, dtype=windows.dtype), windows], dim=1)


def eval_windows(
    tokenizer, text: str, seq_len: int, max_windows: int | None = None, bos_id: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of ``text`` tokenized without special tokens; the tail
    shorter than a window is dropped, as in the papers. With ``bos_id`` each window is BOS followed by
    the next seq_len - 1 text tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    text_len = seq_len - (bos_id is not None)
    n = ids.numel() // text_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EdgeqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return _with_bos(ids[: n * text_len].view(n, text_len), bos_id)


def read_documents(path: str | Path) -> list[str]:
    """Documents from a .parquet (column ``text``), .jsonl (field ``text``) or plain-text file
    (one document: the whole file)."""
    path = Path(path)
    if not path.is_file():
        raise EdgeqError(f"calibration file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            docs = _parquet_texts(path)
        elif suffix in (".jsonl", ".json"):
            docs = _jsonl_texts(path)
        else:
            docs = [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise EdgeqError(f"calibration file {path} is not UTF-8 text") from None
    if any("\x00" in d for d in docs):  # valid UTF-8 but no text: zero-filled or binary data
        raise EdgeqError(f"calibration file {path} is binary (it holds NUL bytes), not text")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise EdgeqError(f"calibration file {path} holds no text")
    return docs


def _parquet_texts(path: Path) -> list[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pyarrow.ArrowException as err:
        raise EdgeqError(f"{path} is not a readable parquet file ({first_line(err)})") from None
    if "text" not in table.column_names:
        raise EdgeqError(f"{path} has no 'text' column (columns: {', '.join(table.column_names)})")
    return [t for t in table.column("text").to_pylist() if t]


def _jsonl_texts(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise EdgeqError(f"{path}:{n} is not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise EdgeqError(f"{path}:{n} has no string field 'text'")
        docs.append(record["text"])
    return docs


def sample_calibration(
    tokenizer,
    documents: list[str],
    num_sequences: int,
    seq_len: int,
    seed: int = 0,
    bos_id: int | None = None,
) -> torch.Tensor:
    """[num_sequences, seq_len] token windows, each from a random document long enough to hold it
    (GPTQ's C4 recipe); documents that are all short are joined into one stream first. With
    ``bos_id`` each window is BOS followed by seq_len - 1 text tokens."""
    rng = random.Random(seed)
    seq_len -= bos_id is not None
    tokenized = [tokenizer(d, add_special_tokens=False).input_ids for d in documents]
    candidates = [ids for ids in tokenized if len(ids) >= seq_len]
    if not candidates:
        stream = [t for ids in tokenized for t in ids]
        if len(stream) < seq_len:
            raise EdgeqError(
                f"calibration text is too short: {len(stream)} tokens, need at least {seq_len} "
                "(pass a longer file or a smaller --calib-seq-len)"
            )
        candidates = [stream]
    windows = []
    for _ in range(num_sequences):
        ids = rng.choice(candidates)
        start = rng.randint(0, len(ids) - seq_len)
        windows.append(ids[start : start + seq_len])
    return _with_bos(torch.tensor(windows, dtype=torch.long), bos_id)


@dataclass(frozen=True)
class TextData:
    """The token windows one run calibrates and evaluates on, and where they came from."""

    calibration: torch.Tensor  # [N, L] calibration token windows
    evaluation: torch.Tensor  # [n, L'] evaluation windows
    calibration_file: Path
    num_documents: int
    bos: BosConvention = BosConvention(None, "tokenizer")


def prepare_text_data(
    tokenizer, calibration: CalibrationConfig, evaluation: EvalConfig, adapter: Adapter | None = None
) -> TextData:
    """Calibration windows (the config's file, or the C4 sample) and the WikiText-2 evaluation windows,
    both with the model's BOS convention (``adapter``'s, else the tokenizer's)."""
    bos = bos_convention(tokenizer, adapter)
    calib_path = Path(calibration.source) if calibration.source else default_file(C4_SAMPLE)
    documents = read_documents(calib_path)
    calib_ids = sample_calibration(
        tokenizer, documents, calibration.num_sequences, calibration.seq_len, calibration.seed, bos.token_id
    )
    text = wikitext2_test_string(evaluation.text)
    windows = eval_windows(tokenizer, text, evaluation.seq_len, evaluation.max_windows, bos.token_id)
    return TextData(calib_ids, windows, calib_path, len(documents), bos)
