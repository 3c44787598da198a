"""What each expert specialises in: token categories of Python code, top tokens, mutual information.

Categories come from the standard library's :mod:`tokenize` (keyword, name, operator, ...), computed
per *character* of the source and mapped onto the model tokenizer's tokens through the character
offsets of a ``tokenizers`` encoding, so any BPE vocabulary works. The mutual information between
category and first-choice expert is compared with a shuffled baseline: contingency tables with the
same margins as a random permutation of the categories would give (multivariate hypergeometric).
"""

from __future__ import annotations

import io
import keyword
import tokenize
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import mutual_info_score

CATEGORIES: tuple[str, ...] = (
    "keyword", "name", "operator", "number", "string", "comment",
    "newline", "indentation", "whitespace", "other",
)
_CAT = {name: i for i, name in enumerate(CATEGORIES)}
_WS_CATS = (_CAT["newline"], _CAT["indentation"], _CAT["whitespace"])
_TOKEN_CAT = {
    tokenize.OP: _CAT["operator"],
    tokenize.NUMBER: _CAT["number"],
    tokenize.STRING: _CAT["string"],
    tokenize.COMMENT: _CAT["comment"],
    tokenize.NEWLINE: _CAT["newline"],
    tokenize.NL: _CAT["newline"],
    tokenize.INDENT: _CAT["indentation"],
    tokenize.ERRORTOKEN: _CAT["other"],
}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python >= 3.12
    if hasattr(tokenize, _name):
        _TOKEN_CAT[getattr(tokenize, _name)] = _CAT["string"]


def python_char_categories(source: str) -> np.ndarray:
    """Category id (index into :data:`CATEGORIES`) of every character of ``source``, ``(len,)`` int8.

    Leading whitespace of a line is ``indentation``, line breaks ``newline``, other blanks
    ``whitespace``; token spans get their :mod:`tokenize` category. If ``source`` stops being
    valid Python for the tokenizer, the characters from that point on are ``-1`` (unknown).
    """
    if not isinstance(source, str):
        raise TypeError(f"source must be a str, got {type(source).__name__}")
    n = len(source)
    cats = np.full(n, _CAT["other"], dtype=np.int8)
    line_starts = [0]
    at_line_start = True
    for i, ch in enumerate(source):
        if ch in "\r\n":
            cats[i] = _CAT["newline"]
            at_line_start = True
            if ch == "\n":  # tokenize reads lines split at "\n" (io.StringIO.readline)
                line_starts.append(i + 1)
        elif ch in " \t\f":
            cats[i] = _CAT["indentation"] if at_line_start else _CAT["whitespace"]
        else:
            at_line_start = False

    def offset(pos: tuple[int, int]) -> int:
        row, col = pos
        return min(n, line_starts[row - 1] + col) if row - 1 < len(line_starts) else n

    last_end = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            start, end = offset(tok.start), offset(tok.end)
            if tok.type == tokenize.NAME:
                cats[start:end] = _CAT["keyword"] if keyword.iskeyword(tok.string) else _CAT["name"]
            elif tok.type in _TOKEN_CAT and tok.type != tokenize.INDENT:
                cats[start:end] = _TOKEN_CAT[tok.type]
            last_end = max(last_end, end)
    except (tokenize.TokenError, SyntaxError):
        cats[last_end:] = -1
    return cats


def token_categories(char_cats: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Category of each model token from its character span ``[start, end)``, ``(N,)`` int64.

    A token takes the most common non-blank category among its characters (``" self"`` is a name);
    an all-blank token is ``newline`` if it holds a line break, else ``indentation`` if it holds
    leading whitespace, else ``whitespace``. Unknown characters (-1) or an empty span give -1.
    """
    out = np.full(len(offsets), -1, dtype=np.int64)
    for i, (s, e) in enumerate(offsets):
        span = np.asarray(char_cats[s:e])
        if span.size == 0 or (span < 0).any():
            continue
        counts = np.bincount(span, minlength=len(CATEGORIES))
        solid = counts.copy()
        solid[list(_WS_CATS)] = 0
        if solid.any():
            out[i] = int(solid.argmax())
        else:
            out[i] = next(c for c in _WS_CATS if counts[c])
    return out


def mutual_information(table_CE: Any) -> float:
    """Mutual information in bits between the row and column variables of a contingency table."""
    t = np.asarray(table_CE, dtype=np.int64)
    if t.ndim != 2:
        raise ValueError(f"table_CE must be 2-D (categories, experts), got shape {t.shape}")
    if t.sum() == 0:
        return 0.0
    return float(mutual_info_score(None, None, contingency=t) / np.log(2))


def shuffled_mutual_information(table_CE: Any, n_shuffles: int = 20, seed: int = 0) -> tuple[float, float]:
    """MI (bits) expected if categories were shuffled across tokens: ``(mean, std)`` over ``n_shuffles``
    random tables with the same margins (exactly the tables a random permutation produces)."""
    t = np.asarray(table_CE, dtype=np.int64)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    rng = np.random.default_rng(seed)
    rows, cols = t.sum(axis=1), t.sum(axis=0)
    values = []
    for _ in range(n_shuffles):
        remaining = cols.copy()
        table = np.zeros_like(t)
        for c, n_c in enumerate(rows):
            if n_c:
                table[c] = rng.multivariate_hypergeometric(remaining, int(n_c))
                remaining -= table[c]
        values.append(mutual_information(table))
    return float(np.mean(values)), float(np.std(values))


def category_entropy(table_CE: Any) -> float:
    """Entropy in bits of the category margin (the upper bound of the MI)."""
    rows = np.asarray(table_CE, dtype=np.float64).sum(axis=1)
    p = rows[rows > 0] / rows.sum() if rows.sum() else rows[:0]
    return float(-(p * np.log2(p)).sum())


def top_tokens(
    token_expert_EV: Any,
    decode: Callable[[int], str],
    k: int = 10,
    min_count: int = 5,
    token_counts_V: Any = None,
) -> list[dict[str, list[tuple[str, float]]]]:
    """Per expert, its ``k`` most frequent tokens and its ``k`` most distinctive ones.

    Returns one dict per expert: ``frequent`` = ``[(token, share of the expert's slots)]`` and
    ``distinctive`` = ``[(token, lift)]`` where lift = P(expert | token) / P(expert), among tokens
    seen at least ``min_count`` times (tokens an expert takes far more often than average), ties
    broken by count. ``token_counts_V``: occurrences per token id (``LayerRecord.token_counts``);
    without it a token's routed slots are counted, K per occurrence under top-K routing.
    """
    te = np.asarray(token_expert_EV, dtype=np.float64)
    if te.ndim != 2:
        raise ValueError(f"token_expert_EV must be 2-D (E, V), got shape {te.shape}")
    per_token = te.sum(axis=0)
    seen = per_token
    if token_counts_V is not None:
        seen = np.asarray(token_counts_V, dtype=np.float64)[: te.shape[1]]
    per_expert = te.sum(axis=1)
    total = te.sum()
    out = []
    for e in range(te.shape[0]):
        row = te[e]
        freq_ids = [int(v) for v in np.argsort(-row, kind="stable")[:k] if row[v] > 0]
        frequent = [(decode(v), float(row[v] / per_expert[e])) for v in freq_ids]
        distinctive: list[tuple[str, float]] = []
        if per_expert[e] > 0:
            ok = seen >= min_count
            with np.errstate(divide="ignore", invalid="ignore"):
                lift = np.where(ok, (row / np.maximum(per_token, 1)) / (per_expert[e] / total), -np.inf)
            for v in np.lexsort((-row, -lift))[:k]:  # by lift, ties by count
                if np.isfinite(lift[v]) and row[v] > 0:
                    distinctive.append((decode(int(v)), float(lift[v])))
        out.append({"frequent": frequent, "distinctive": distinctive})
    return out
