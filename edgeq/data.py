"""Calibration and evaluation text.

Evaluation follows the GPTQ/QuaRot/BoA papers: the WikiText-2 raw test split joined into one string
(see ``wikitext2_test_string``), tokenized without BOS, cut into non-overlapping windows.
Calibration samples random token windows from documents (C4 parquet, JSON lines or plain text).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from edgeq.config import CalibrationConfig, EvalConfig
from edgeq.errors import EdgeqError

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


def eval_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seq_len] of ``text`` tokenized without special tokens; the tail
    shorter than a window is dropped, as in the papers."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    n = ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise EdgeqError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


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
        raise EdgeqError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]})") from None
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
    tokenizer, documents: list[str], num_sequences: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """[num_sequences, seq_len] token windows, each from a random document long enough to hold it
    (GPTQ's C4 recipe); documents that are all short are joined into one stream first."""
    rng = random.Random(seed)
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
    return torch.tensor(windows, dtype=torch.long)


@dataclass(frozen=True)
class TextData:
    """The token windows one run calibrates and evaluates on, and where they came from."""

    calibration: torch.Tensor  # [N, L] calibration token windows
    evaluation: torch.Tensor  # [n, L'] evaluation windows
    calibration_file: Path
    num_documents: int


def prepare_text_data(tokenizer, calibration: CalibrationConfig, evaluation: EvalConfig) -> TextData:
    """Calibration windows (the config's file, or the C4 sample) and the WikiText-2 evaluation windows."""
    calib_path = Path(calibration.source) if calibration.source else default_file(C4_SAMPLE)
    documents = read_documents(calib_path)
    calib_ids = sample_calibration(
        tokenizer, documents, calibration.num_sequences, calibration.seq_len, calibration.seed
    )
    text = wikitext2_test_string(evaluation.text)
    windows = eval_windows(tokenizer, text, evaluation.seq_len, evaluation.max_windows)
    return TextData(calib_ids, windows, calib_path, len(documents))
