"""Byte-level BPE tokenizer trained with Hugging Face ``tokenizers`` on the training split.

Byte-level means every string round-trips: ``decode(encode(s)) == s`` for any Unicode text,
including characters never seen in training (they fall back to their UTF-8 bytes), once the text of
a special token is encoded as text (``encode_special_tokens``, as training data is:
:func:`moekit.train.data.encode_documents`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1


def _capped(texts: Iterable[str], max_chars: int | None) -> Iterator[str]:
    used = 0
    for text in texts:
        if max_chars is not None:
            if used >= max_chars:
                return
            text = text[: max_chars - used]
        used += len(text)
        yield text


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, max_chars: int | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer.

    Args:
        texts: training documents (iterated once, in order).
        vocab_size: target size including the 256 byte symbols and ``SPECIAL_TOKENS``; the result
            may be smaller when the text is too short to learn that many merges.
        max_chars: use at most this many characters of ``texts`` (deterministic prefix).
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ValueError(
            f"vocab_size must be an int >= {minimum} (256 bytes + special tokens), got {vocab_size!r}"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_capped(texts, max_chars), trainer=trainer)
    return tokenizer


def eos_token_id(tokenizer: Tokenizer) -> int:
    """Id of the end-of-text token that separates documents."""
    token_id = tokenizer.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; it was not made by moekit.train")
    return token_id


def save_tokenizer(tokenizer: Tokenizer, path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer saved by :func:`save_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on a damaged file
        raise ValueError(f"{path}: cannot load tokenizer ({e})") from None
