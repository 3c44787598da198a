"""Token streams: documents -> one flat id array -> batches of windows, with a resumable position.

Shape legend: ``B`` batch size, ``S`` sequence length (tokens per window), ``N`` tokens in the stream.

The training stream cuts the ``N`` ids into ``N // S`` non-overlapping windows and visits them in a
fresh permutation every epoch. The permutation of epoch ``e`` is a pure function of ``(seed, e)``,
so the stream's whole state is one integer, ``position`` (windows consumed so far): saving it in a
checkpoint and restoring it reproduces every later batch exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer


def encode_literal(tokenizer: Tokenizer, texts: list[str]) -> list[Any]:
    """``tokenizer.encode_batch(texts)`` without added special tokens, and with a special token's text
    inside a document (``"<|endoftext|>"`` in source code about tokenizers) encoded as the text it
    is, not as the token: only the separator placed after each document ends it."""
    literal = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        return tokenizer.encode_batch(texts, add_special_tokens=False)
    finally:
        tokenizer.encode_special_tokens = literal


def encode_documents(tokenizer: Tokenizer, texts: Iterable[str], eos_id: int) -> np.ndarray:
    """Tokenise ``texts`` and concatenate them, each followed by ``eos_id``; returns ``(N,)`` int32.
    Special-token text inside a document is text (:func:`encode_literal`)."""
    encodings = encode_literal(tokenizer, list(texts))
    pieces = []
    eos = np.array([eos_id], dtype=np.int32)
    for enc in encodings:
        pieces.append(np.asarray(enc.ids, dtype=np.int32))
        pieces.append(eos)
    if not pieces:
        return np.zeros(0, dtype=np.int32)
    return np.concatenate(pieces)


def _windows(tokens: np.ndarray, seq_len: int, what: str) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"{what} tokens must be 1-D, got shape {tuple(tokens.shape)}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    n = len(tokens) // seq_len
    if n < 1:
        raise ValueError(
            f"the {what} split has {len(tokens)} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or lower --seq-len"
        )
    return n


class TokenStream:
    """Shuffled batches of ``(B, S)`` windows from a flat token array, resumable by ``position``.

    Args:
        tokens: ``(N,)`` integer ids.
        seq_len: ``S``, tokens per window (the model sees ``S`` tokens, predicts ``S - 1``).
        batch_size: ``B``, windows per batch.
        seed: fixes the per-epoch permutations.
        position: windows consumed so far (restore a checkpoint's value to resume).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, position: int = 0):
        self.num_windows = _windows(tokens, seq_len, "training")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(position, int) or position < 0:
            raise ValueError(f"position must be an int >= 0, got {position!r}")
        used = tokens[: self.num_windows * seq_len]
        self.tokens = torch.from_numpy(np.ascontiguousarray(used, dtype=np.int64))
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.position = position
        self._perm_epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    @property
    def epoch(self) -> float:
        """Fractional number of passes over the training windows so far."""
        return self.position / self.num_windows

    def _window_index(self, position: int) -> int:
        epoch, index = divmod(position, self.num_windows)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return int(self._perm[index])

    def next_batch(self) -> torch.Tensor:
        """The next ``(B, S)`` int64 batch; advances ``position`` by ``B``."""
        windows = self.tokens.view(self.num_windows, self.seq_len)
        index = [self._window_index(self.position + i) for i in range(self.batch_size)]
        self.position += self.batch_size
        return windows[torch.tensor(index)]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        same = state.get("num_windows", self.num_windows) == self.num_windows
        if not same or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                "data stream state does not match this data (different token count, seq_len or seed)"
            )
        self.position = int(state["position"])


def validation_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int
) -> list[torch.Tensor]:
    """Fixed validation batches: the first ``max_batches * batch_size`` windows in order.

    Returns a list of ``(b, S)`` int64 tensors (the last one may be smaller); always at least one.
    """
    n = _windows(tokens, seq_len, "validation")
    n = min(n, max_batches * batch_size)
    windows = torch.from_numpy(np.ascontiguousarray(tokens[: n * seq_len], dtype=np.int64)).view(n, seq_len)
    return list(windows.split(batch_size))
