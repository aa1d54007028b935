"""Reading text, tokenizers, and the block sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aios_ray.data.dataset import BlockSampler, SamplerState, tokenize_documents
from aios_ray.data.text import read_documents
from aios_ray.data.tokenizer import END_OF_TEXT, eos_id, load_tokenizer, train_bpe
from aios_ray.errors import DataError

PROSE = ("The quick brown fox jumps over the lazy dog. " * 20 + "\n\n") * 5


def test_txt_jsonl_and_folder(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "a record"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    assert read_documents(str(tmp_path / "a.txt")) == ["first paragraph", "second paragraph"]
    assert read_documents(str(tmp_path / "b.jsonl")) == ["a record", "two"]
    assert read_documents(str(tmp_path)) == ["first paragraph", "second paragraph", "a record", "two"]


def test_ascii_only_drops_other_characters(tmp_path: Path):
    (tmp_path / "u.txt").write_text("caf\u00e9 na\u00efve", encoding="utf-8")
    assert read_documents(str(tmp_path / "u.txt"), ascii_only=True) == ["caf nave"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"", "empty file"),
        ("blank.txt", b"  \n\n ", "empty file"),
        ("bin.txt", b"abc\0def", "binary file"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not UTF-8 text (invalid byte at offset 3)"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: malformed JSON"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', "notext.jsonl:2: expected an object"),
    ],
)
def test_bad_files_are_named_in_one_line(tmp_path: Path, name: str, content: bytes, message: str):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_documents(str(path))
    assert message in str(err.value) and name in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_path_and_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="no such file"):
        read_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(DataError, match="no .txt or .jsonl"):
        read_documents(str(tmp_path))


def test_trained_bpe_round_trips_and_loads_in_transformers(tmp_path: Path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe([PROSE], vocab_size=300)
    path = tmp_path / "tokenizer.json"
    path.write_text(tokenizer.to_str(), encoding="utf-8")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    text = "The lazy fox \u00e9t\u00e9!"  # unseen characters still encode: byte-level
    assert hf.decode(hf.encode(text)) == text
    assert hf.encode(text) == tokenizer.encode(text).ids
    assert eos_id(load_tokenizer(str(tmp_path), "--tokenizer")) == tokenizer.token_to_id(END_OF_TEXT)


def test_corrupt_tokenizer_is_a_data_error(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(str(tmp_path), "--tokenizer")


def test_documents_are_separated_by_end_of_text():
    tokenizer = train_bpe([PROSE], vocab_size=300)
    eos = eos_id(tokenizer)
    tokens = tokenize_documents(tokenizer, ["ab", "cd"], eos)
    assert tokens.dtype == np.int32 and (tokens == eos).sum() == 2 and tokens[-1] == eos


def test_sampler_resumes_exactly_and_splits_ranks():
    tokens = np.arange(1000, dtype=np.int32)
    full = BlockSampler(tokens, seq_len=9, batch_size=4, seed=7)
    seen = [full.next_batch()[0] for _ in range(60)]  # crosses several epochs
    state = None
    resumed = BlockSampler(tokens, seq_len=9, batch_size=4, seed=7)
    for i in range(60):
        if i == 33:
            state = SamplerState(resumed.state.epoch, resumed.state.batch)
            resumed = BlockSampler(tokens, seq_len=9, batch_size=4, seed=7, state=state)
        assert np.array_equal(resumed.next_batch()[0], seen[i])
    rank0 = BlockSampler(tokens, 9, 4, seed=7, rank=0, world_size=2)
    rank1 = BlockSampler(tokens, 9, 4, seed=7, rank=1, world_size=2)
    assert np.array_equal(rank0.next_batch()[0], seen[0]) and np.array_equal(rank1.next_batch()[0], seen[1])


def test_two_ranks_of_batch_b_take_the_blocks_of_one_rank_of_batch_2b():
    """DDP with 2 workers x B trains step by step on the global batches of 1 worker x 2B (rank 0 the first B rows,
    rank 1 the next), across epoch boundaries: what tests/test_ray_train.py's equivalence rests on."""
    tokens = np.arange(1000, dtype=np.int32)  # 111 blocks: 13 steps per epoch either way
    single = BlockSampler(tokens, seq_len=9, batch_size=8, seed=7)
    ranks = [BlockSampler(tokens, seq_len=9, batch_size=4, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(40):
        whole = single.next_batch()[0]
        assert np.array_equal(np.concatenate([rank.next_batch()[0] for rank in ranks]), whole)
    assert single.state.epoch == ranks[0].state.epoch == 3


def test_too_little_data_is_a_data_error():
    with pytest.raises(DataError, match="training data too small"):
        BlockSampler(np.arange(20, dtype=np.int32), seq_len=8, batch_size=4, seed=0)
