"""Tests of edgeq/data.py: the evaluation string, evaluation windows, document reading, calibration."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import byte_tokenizer

from edgeq.data import bos_convention, eval_windows, read_documents, sample_calibration, wikitext2_test_string
from edgeq.errors import EdgeqError
from edgeq.models.adapters import GEMMA3, LLAMA

REAL_WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared/data/wikitext-2-raw/wiki.test.raw"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


# ---------------------------------------------------------------- wikitext2_test_string


def test_wikitext2_string_follows_recipe(tmp_path: Path):
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n".join(["a", "", " b"]) + "\n", encoding="utf-8")
    assert wikitext2_test_string(path) == "\n\n".join(["a\n", "", " b\n"])
    assert wikitext2_test_string(str(path)) == "a\n\n\n\n\n b\n"


def test_wikitext2_string_whitespace_only_lines_become_empty_rows(tmp_path: Path):
    path = tmp_path / "wiki.test.raw"
    path.write_text(" \n = T = \n \n x y\n", encoding="utf-8")
    text = wikitext2_test_string(path)
    assert text == "\n\n".join(["", " = T = \n", "", " x y\n"])
    assert text.startswith("\n\n = T = \n\n\n\n\n x y")


def test_wikitext2_string_starts_with_blank_rows_like_the_real_file(tmp_path: Path):
    path = tmp_path / "wiki.test.raw"
    path.write_text("\n = Title = \n\n body .\n", encoding="utf-8")
    text = wikitext2_test_string(path)
    assert text.startswith("\n\n")
    assert text == "\n\n = Title = \n\n\n\n\n body .\n"


def test_wikitext2_string_default_file_from_data_dir(text_data_dir: Path):
    text = wikitext2_test_string()
    assert text == wikitext2_test_string(text_data_dir / "wikitext-2-raw" / "wiki.test.raw")
    assert text.startswith(" = Title = \n\n\n\n\n sentence number 0")


def test_wikitext2_string_missing_file(tmp_path: Path):
    with pytest.raises(EdgeqError):
        wikitext2_test_string(tmp_path / "nope.raw")


@pytest.mark.skipif(not REAL_WIKITEXT.exists(), reason=f"{REAL_WIKITEXT} not present")
def test_wikitext2_string_real_file():
    text = wikitext2_test_string(REAL_WIKITEXT)
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is")


# ---------------------------------------------------------------- eval_windows


def test_eval_windows_are_the_leading_non_overlapping_windows(tok):
    text = "the quick brown fox jumps over the lazy dog " * 5  # 225 characters = 225 tokens
    ids = torch.tensor(_ids(tok, text))
    assert ids.numel() == len(text)
    windows = eval_windows(tok, text, seq_len=16)
    n = ids.numel() // 16
    assert windows.shape == (n, 16)
    assert windows.dtype == torch.long
    assert torch.equal(windows.reshape(-1), ids[: n * 16])
    # no overlap: consecutive windows continue each other
    for i in range(n - 1):
        assert torch.equal(windows[i + 1], ids[(i + 1) * 16 : (i + 2) * 16])


def test_eval_windows_no_bos(tok):
    text = "abcdefgh"
    windows = eval_windows(tok, text, seq_len=8)
    assert windows.tolist() == [_ids(tok, text)]


def test_eval_windows_with_bos_start_with_it_and_still_tile_the_text(tok):
    text = "the quick brown fox jumps over the lazy dog " * 5
    ids = _ids(tok, text)
    windows = eval_windows(tok, text, seq_len=16, bos_id=1)
    n = len(ids) // 15
    assert windows.shape == (n, 16)
    assert windows[:, 0].tolist() == [1] * n
    assert windows[:, 1:].reshape(-1).tolist() == ids[: n * 15]


def test_calibration_windows_with_bos_start_with_it(tok):
    docs = ["abcdefghijklmnopqrstuvwxyz" * 2, "0123456789" * 4]
    plain = sample_calibration(tok, docs, num_sequences=6, seq_len=12, seed=3)
    with_bos = sample_calibration(tok, docs, num_sequences=6, seq_len=12, seed=3, bos_id=1)
    assert with_bos.shape == plain.shape == (6, 12)
    assert with_bos[:, 0].tolist() == [1] * 6
    texts = ["".join(d) for d in docs]
    for row in with_bos[:, 1:].tolist():  # 11 consecutive characters of one document
        assert any(tok.decode(row).replace(" ", "") in t for t in texts)


def test_bos_convention_follows_the_tokenizer_unless_the_adapter_declares_one():
    no_bos = byte_tokenizer()
    assert bos_convention(no_bos).token_id is None
    with pytest.raises(EdgeqError, match="tokenizer has none"):
        bos_convention(no_bos, GEMMA3)
    with_bos = byte_tokenizer()
    with_bos.add_special_tokens({"bos_token": "<eos>"})  # a BOS token the tokenizer does not add
    assert bos_convention(with_bos, LLAMA).token_id is None  # Llama follows the tokenizer
    declared = bos_convention(with_bos, GEMMA3)
    assert (declared.token_id, declared.source) == (with_bos.bos_token_id, "adapter")
    assert "BOS (id 1)" in declared.describe() and "adapter" in declared.describe()


def test_eval_windows_max_windows_caps(tok):
    text = "abcdefghij" * 10  # 100 tokens
    ids = torch.tensor(_ids(tok, text))
    windows = eval_windows(tok, text, seq_len=10, max_windows=3)
    assert windows.shape == (3, 10)
    assert torch.equal(windows.reshape(-1), ids[:30])
    # a cap above the available count changes nothing
    assert eval_windows(tok, text, seq_len=10, max_windows=50).shape == (10, 10)
    assert eval_windows(tok, text, seq_len=10, max_windows=None).shape == (10, 10)


def test_eval_windows_text_shorter_than_one_window(tok):
    with pytest.raises(EdgeqError):
        eval_windows(tok, "short", seq_len=16)


# ---------------------------------------------------------------- read_documents


def test_read_documents_parquet(tmp_path: Path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["first doc", "second doc", "", None], "url": list("abcd")}), path)
    assert read_documents(path) == ["first doc", "second doc"]


def test_read_documents_parquet_from_fixture(text_data_dir: Path):
    docs = read_documents(text_data_dir / "c4-sample" / "c4_validation_docs0-999.parquet")
    assert len(docs) == 20
    assert docs[0].startswith("word0 of document 0.")


def test_read_documents_jsonl(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": "one", "id": 1}), "", "   ", json.dumps({"text": "two"}), ""]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert read_documents(path) == ["one", "two"]


def test_read_documents_plain_text_is_one_document(tmp_path: Path):
    path = tmp_path / "corpus.txt"
    body = "line one\n\nline two\n"
    path.write_text(body, encoding="utf-8")
    assert read_documents(path) == [body]
    assert read_documents(str(path)) == [body]


def test_read_documents_missing_file(tmp_path: Path):
    with pytest.raises(EdgeqError, match="not found"):
        read_documents(tmp_path / "missing.jsonl")


def test_read_documents_directory_is_not_a_file(tmp_path: Path):
    with pytest.raises(EdgeqError):
        read_documents(tmp_path)


@pytest.mark.parametrize("name", ["empty.txt", "empty.jsonl", "blank.txt"])
def test_read_documents_empty_file(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_text("  \n\n" if name.startswith("blank") else "", encoding="utf-8")
    with pytest.raises(EdgeqError, match="no text"):
        read_documents(path)


def test_read_documents_empty_parquet(tmp_path: Path):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), path)
    with pytest.raises(EdgeqError, match="no text"):
        read_documents(path)


def test_read_documents_parquet_without_text_column(tmp_path: Path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), path)
    with pytest.raises(EdgeqError, match="'text' column"):
        read_documents(path)


def test_read_documents_jsonl_line_not_json(tmp_path: Path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(EdgeqError, match=r"docs\.jsonl:2"):
        read_documents(path)


@pytest.mark.parametrize(
    "record", [{"body": "x"}, {"text": 3}, {"text": None}, ["text", "x"], "just a string"]
)
def test_read_documents_jsonl_record_without_text(tmp_path: Path, record):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(EdgeqError, match="'text'"):
        read_documents(path)


# ---------------------------------------------------------------- sample_calibration

# Documents over distinct alphabets, so a window's origin is unambiguous.
DOCS = [
    "abcdefghijklmnopqrstuvwxyz" * 2,
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2,
    "0123456789!#$%&()*+,-./:;<=>?@[]^_{|}" * 2,
    "short",  # shorter than a window: never a candidate while longer documents exist
]


def _is_slice(window: list[int], ids: list[int]) -> bool:
    n = len(window)
    return any(ids[s : s + n] == window for s in range(len(ids) - n + 1))


def test_sample_calibration_shape_dtype(tok):
    out = sample_calibration(tok, DOCS, num_sequences=7, seq_len=12, seed=0)
    assert out.shape == (7, 12)
    assert out.dtype == torch.long


def test_sample_calibration_seeded(tok):
    a = sample_calibration(tok, DOCS, num_sequences=16, seq_len=12, seed=1)
    b = sample_calibration(tok, DOCS, num_sequences=16, seq_len=12, seed=1)
    c = sample_calibration(tok, DOCS, num_sequences=16, seq_len=12, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_calibration_windows_are_contiguous_slices_of_one_document(tok):
    seq_len = 12
    tokenized = [_ids(tok, d) for d in DOCS]
    out = sample_calibration(tok, DOCS, num_sequences=40, seq_len=seq_len, seed=3)
    used = set()
    for window in out.tolist():
        sources = [i for i, ids in enumerate(tokenized) if _is_slice(window, ids)]
        assert len(sources) == 1, window
        assert len(tokenized[sources[0]]) > seq_len
        used.add(sources[0])
    assert 3 not in used
    assert len(used) >= 2  # draws from several documents


def test_sample_calibration_short_documents_are_joined(tok):
    docs = ["abcde", "fghij", "klmno", "pqrst"]
    seq_len = 8
    stream = [t for d in docs for t in _ids(tok, d)]
    out = sample_calibration(tok, docs, num_sequences=20, seq_len=seq_len, seed=0)
    assert out.shape == (20, seq_len)
    for window in out.tolist():
        assert _is_slice(window, stream)
        # every 8-token window spans a document boundary (documents hold 5 tokens)
        assert not any(_is_slice(window, _ids(tok, d)) for d in docs)


def test_sample_calibration_stream_exactly_one_window(tok):
    docs = ["abcd", "efgh"]
    out = sample_calibration(tok, docs, num_sequences=3, seq_len=8, seed=0)
    assert out.tolist() == [_ids(tok, "abcdefgh")] * 3


def test_sample_calibration_too_short(tok):
    with pytest.raises(EdgeqError, match="too short"):
        sample_calibration(tok, ["abc", "de"], num_sequences=2, seq_len=16, seed=0)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("latin1.txt", "caf\xe9 au lait".encode("latin-1"), "not UTF-8"),
        ("broken.parquet", b"this is not parquet", "not a readable parquet"),
        ("UPPER.JSONL", b'{"nope": 1}\n', "no string field 'text'"),
    ],
)
def test_unreadable_calibration_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(EdgeqError, match=message) as err:
        read_documents(path)
    assert "\n" not in str(err.value)


def test_a_document_exactly_one_window_long_is_sampled_whole():
    tokenizer = byte_tokenizer()
    ids = sample_calibration(tokenizer, ["abcdefgh", "xy"], num_sequences=3, seq_len=8, seed=0)
    expected = tokenizer("abcdefgh", add_special_tokens=False).input_ids
    assert all(row.tolist() == expected for row in ids)
