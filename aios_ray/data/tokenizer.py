"""Tokenizers: train a byte-level BPE on the training text, or load a local ``tokenizer.json``.

Nothing is downloaded. The trained tokenizer is a plain Hugging Face ``tokenizers`` file, loadable by
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from aios_ray.errors import DataError

END_OF_TEXT = "<|endoftext|>"
_EOS_CANDIDATES = (END_OF_TEXT, "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    return tokenizer


def load_tokenizer(path_str: str, flag: str) -> Tokenizer:
    """A ``tokenizer.json`` file, or a directory (HF model dir or brain bundle) that holds one."""
    path = Path(path_str)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{flag} {path_str}: no tokenizer.json there")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise DataError(f"{file}: not a valid tokenizer.json ({str(exc).splitlines()[0][:120]})") from None


def eos_id(tokenizer: Tokenizer) -> int | None:
    for token in _EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None
