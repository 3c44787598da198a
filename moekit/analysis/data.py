"""Text -> token windows for routing analysis, with per-token Python categories and a text sample.

Shape legend: ``N`` windows, ``S`` tokens per window. Documents are tokenised with the model's
``tokenizers.Tokenizer`` (character offsets included), concatenated with an end-of-text token in
between (as in training) and cut into ``(N, S)`` windows, row-major = stream order.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from moekit.analysis.specialization import python_char_categories, token_categories
from moekit.train.data import encode_literal


@dataclass
class TokenWindows:
    """Tokenised analysis data.

    Attributes:
        ids_NS: ``(N, S)`` int64 token ids.
        categories_NS: ``(N, S)`` int64 category ids (``specialization.CATEGORIES``), -1 = unknown
            (not Python code, a document separator, ...).
        sample_pieces: the text of the first tokens of the stream, one string per token, that
            concatenate back to the source text (None for a separator token; "" for a token that
            adds no character of its own, e.g. the second byte of a multi-byte character).
        python_documents / documents: how many documents parsed as Python, out of how many used.
    """

    ids_NS: np.ndarray
    categories_NS: np.ndarray
    sample_pieces: list[str | None] = field(default_factory=list)
    python_documents: int = 0
    documents: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.ids_NS.size)


_NOT_A_STATEMENT = ("", " ", "\t", "\n", "#", ")", "]", "}")  # first characters of lines that are not


def is_python(text: str, tries: int = 20) -> bool:
    """True if ``text`` parses as a Python module (category statistics are only meaningful then), or
    is one cut short (a file truncated to a character budget): its text up to a top-level statement
    start (a line beginning in column 0) before the syntax error parses and is at least half of it;
    up to ``tries`` such starts are tried. (A cut file's categories end where its tokenizer stops.)"""

    def error_line(code: str) -> int | None:  # None: it parses; 0: not Python at all
        try:
            ast.parse(code)
        except SyntaxError as err:
            return err.lineno or 0
        except (ValueError, RecursionError, MemoryError):
            return 0
        return None

    line = error_line(text)
    if line is None:
        return True
    starts = [0, *(m.end() for m in re.finditer("\n", text))]  # where each line begins
    index = min(line, len(starts)) - 1  # a cut has to come before the error's line
    for _ in range(tries):
        while index > 0 and text[starts[index] : starts[index] + 1] in _NOT_A_STATEMENT:
            index -= 1  # not a statement start: indented, blank, a comment, a closing bracket
        if starts[index] < len(text) // 2:
            return False
        line = error_line(text[: starts[index]])
        if line is None:
            return True
        index = min(line, index) - 1  # before the prefix's own error (a string opened further up)
    return False


def balanced_cap(lengths: Sequence[int], budget: int, extra: int = 0) -> int:
    """Smallest per-document cap ``c`` with ``sum(min(length, c) + extra) >= budget`` (the largest
    length when even no cap falls short): water-filling of the budget over the documents."""
    if not lengths:
        return 1
    lo, hi = 1, max(max(lengths), 1)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(n, mid) + extra for n in lengths) >= budget:
            hi = mid
        else:
            lo = mid + 1
    return lo


def encode_windows(
    tokenizer: Tokenizer,
    texts: Sequence[str],
    seq_len: int,
    max_tokens: int,
    *,
    separator_id: int | None = None,
    sample_tokens: int = 512,
    max_doc_tokens: int | str | None = None,
) -> TokenWindows:
    """Tokenise ``texts`` into at most ``max_tokens`` tokens cut into windows of ``seq_len``.

    Args:
        tokenizer: the model's tokenizer (its encodings carry character offsets).
        texts: documents, used in order until ``max_tokens`` is reached.
        seq_len: tokens per window ``S`` (``<=`` the model's context).
        max_tokens: token budget; rounded down to whole windows (at least one window is needed).
        separator_id: token placed after each document (e.g. end-of-text); None = no separator.
        sample_tokens: how many leading tokens keep their text piece for the coloured sample.
        max_doc_tokens: keep at most this many tokens of each document (None = all), so that one
            huge file (say, a module that is one long string) cannot fill the whole budget;
            ``"balanced"`` picks the smallest such cap that still fills ``max_tokens`` (every text
            is tokenised first), i.e. short documents whole and long ones cut to the same length.

    Raises:
        ValueError: bad sizes, or fewer than ``seq_len`` tokens of text.
    """
    if max_doc_tokens not in (None, "balanced") and (
        not isinstance(max_doc_tokens, int) or isinstance(max_doc_tokens, bool) or max_doc_tokens < 1
    ):
        raise ValueError(f"max_doc_tokens must be an int >= 1, 'balanced' or None, got {max_doc_tokens!r}")
    for name, value in (("seq_len", seq_len), ("max_tokens", max_tokens)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise ValueError(f"{name} must be an int >= 2, got {value!r}")
    if max_tokens < seq_len:
        raise ValueError(f"max_tokens ({max_tokens}) must be >= seq_len ({seq_len}): one window at least")
    ids: list[np.ndarray] = []
    cats: list[np.ndarray] = []
    pieces: list[str | None] = []
    total = 0
    starts: list[tuple[int, bool]] = []  # each document's first stream position, whether it is Python
    texts = [t for t in texts if t]
    encodings: list[Any] = []
    if max_doc_tokens == "balanced":
        encodings = encode_literal(tokenizer, texts)
        extra = int(separator_id is not None)
        max_doc_tokens = balanced_cap([len(e.ids) for e in encodings], max_tokens, extra)
    for i, text in enumerate(texts):
        if total >= max_tokens:
            break
        enc = encodings[i] if encodings else encode_literal(tokenizer, [text])[0]
        python = is_python(text)
        starts.append((total, python))
        if python:
            doc_cats = token_categories(python_char_categories(text), enc.offsets)
        else:
            doc_cats = np.full(len(enc.ids), -1, dtype=np.int64)
        doc_ids = np.asarray(enc.ids, dtype=np.int64)
        kept = len(doc_ids) if max_doc_tokens is None else min(len(doc_ids), max_doc_tokens)
        doc_ids, doc_cats = doc_ids[:kept], doc_cats[:kept]
        if separator_id is not None:
            doc_ids = np.append(doc_ids, separator_id)
            doc_cats = np.append(doc_cats, -1)
        if len(pieces) < sample_tokens:
            prev = 0
            for _, end in enc.offsets[:kept]:  # a piece runs from the previous token's end: lossless
                pieces.append(text[prev:end] if end > prev else "")
                prev = max(prev, end)
            if kept and prev < len(text) and kept == len(enc.ids):
                pieces[-1] += text[prev:]
            if separator_id is not None:
                pieces.append(None)
            del pieces[sample_tokens:]
        ids.append(doc_ids)
        cats.append(doc_cats)
        total += len(doc_ids)
    stream = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    stream_cats = np.concatenate(cats) if cats else np.zeros(0, dtype=np.int64)
    n = min(len(stream), max_tokens) // seq_len
    if n < 1:
        raise ValueError(
            f"the analysis data has {len(stream)} tokens, fewer than one window of seq_len={seq_len}; "
            "give more text or a smaller seq_len"
        )
    inside = [python for start, python in starts if start < n * seq_len]  # documents the windows reach
    return TokenWindows(
        ids_NS=stream[: n * seq_len].reshape(n, seq_len),
        categories_NS=stream_cats[: n * seq_len].reshape(n, seq_len),
        sample_pieces=pieces[: n * seq_len],
        python_documents=sum(inside),
        documents=len(inside),
    )
