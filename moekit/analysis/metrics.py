"""Routing metrics: pure functions over recorded routing (NumPy in, floats / arrays out).

Shape legend (as in ``moekit.core``): ``T`` tokens, ``E`` experts, ``K`` slots per token,
``B`` sequences, ``S`` positions in a sequence. ``ids`` use ``-1`` for an unused slot (expert choice).

Two families:

* load statistics over per-expert counts ``counts_E`` (how many routed slots each expert got):
  fractions, coefficient of variation, max/mean, dead experts, entropy of the load, effective
  number of experts;
* per-token statistics over ``ids_TK`` / ``logits_TE``: gate entropy, the co-selection matrix of the
  top-k choices, and the Mixtral paper's Table 5 consecutive-token statistics (same first choice,
  at least one shared expert) with their random baselines.

:func:`layer_metrics` turns one layer's streaming aggregates (``recorder.LayerRecord``) into a flat
dict, :func:`overall_metrics` pools those over layers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from moekit.analysis.recorder import LayerRecord


def _counts(counts_E: Any) -> np.ndarray:
    c = np.asarray(counts_E, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"counts_E must be a non-empty 1-D array of per-expert counts, got shape {c.shape}")
    if np.any(c < 0):
        raise ValueError("counts_E must be >= 0")
    return c


# ----------------------------------------------------------------------------- load statistics


def load_fractions(counts_E: Any) -> np.ndarray:
    """Fraction of routed slots per expert, ``(E,)`` summing to 1 (all zeros if nothing was routed)."""
    c = _counts(counts_E)
    total = c.sum()
    return c / total if total > 0 else np.zeros_like(c)


def load_cv(counts_E: Any) -> float:
    """Coefficient of variation of the load, ``std / mean`` (population std); 0 = perfectly balanced."""
    c = _counts(counts_E)
    mean = c.mean()
    return float(c.std() / mean) if mean > 0 else 0.0


def max_mean_load(counts_E: Any) -> float:
    """``max(counts) / mean(counts)``: 1 = balanced, ``E`` = one expert takes everything."""
    c = _counts(counts_E)
    mean = c.mean()
    return float(c.max() / mean) if mean > 0 else 0.0


def dead_experts(counts_E: Any, min_fraction: float = 0.0) -> list[int]:
    """Experts whose load fraction is ``<= min_fraction`` (default: never chosen)."""
    if min_fraction < 0:
        raise ValueError(f"min_fraction must be >= 0, got {min_fraction!r}")
    return [int(e) for e in np.flatnonzero(load_fractions(counts_E) <= min_fraction)]


def entropy(p: Any, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats of distributions along ``axis`` (``0 log 0 = 0``)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(axis=axis)


def load_entropy(counts_E: Any, normalized: bool = True) -> float:
    """Entropy of the load distribution; ``normalized`` divides by ``log E`` (1 = uniform, 0 = one
    expert takes everything; NaN with a single expert, where it is undefined)."""
    p = load_fractions(counts_E)
    h = float(entropy(p))
    if not normalized:
        return h
    return h / math.log(p.size) if p.size > 1 else math.nan


def effective_num_experts(counts_E: Any) -> float:
    """``exp(entropy of the load)``: the number of equally used experts with the same entropy (1..E)."""
    p = load_fractions(counts_E)
    return float(math.exp(entropy(p))) if p.sum() > 0 else 0.0


# ----------------------------------------------------------------------------- per-token statistics


def gate_entropy(logits_TE: Any) -> np.ndarray:
    """Entropy (nats) of ``softmax(logits)`` per token, ``(T,)``; divide by ``log E`` to normalise."""
    z = np.asarray(logits_TE, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits_TE must be 2-D (T, E), got shape {z.shape}")
    z = z - z.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return -(p * np.where(p > 0, log_p, 0.0)).sum(axis=1)  # 0 log 0 = 0 (masked, -inf logits)


def first_choice(ids_TK: Any, weights_TK: Any | None = None) -> np.ndarray:
    """First-choice expert per token, ``(T,)``: the valid slot with the largest weight (or the first
    valid slot when ``weights_TK`` is None); -1 for a token no expert took."""
    ids = np.asarray(ids_TK)
    if ids.ndim != 2:
        raise ValueError(f"ids_TK must be 2-D (T, K), got shape {ids.shape}")
    valid = ids >= 0
    if weights_TK is None:
        score = np.where(valid, -np.arange(ids.shape[1])[None, :], -np.inf)
    else:
        w = np.asarray(weights_TK, dtype=np.float64)
        if w.shape != ids.shape:
            raise ValueError(f"weights_TK shape {w.shape} must equal ids_TK shape {ids.shape}")
        score = np.where(valid, w, -np.inf)
    if ids.shape[1] == 0:
        return np.full(ids.shape[0], -1, dtype=np.int64)
    slot = score.argmax(axis=1)
    first = ids[np.arange(ids.shape[0]), slot].astype(np.int64)
    first[~valid.any(axis=1)] = -1
    return first


def _check_ids(ids_TK: Any, num_experts: int) -> np.ndarray:
    ids = np.asarray(ids_TK, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"ids_TK must be 2-D (T, K), got shape {ids.shape}")
    if ids.size and ids.max() >= num_experts:
        raise ValueError(f"ids_TK holds expert {int(ids.max())} but num_experts is {num_experts}")
    return ids


def selection_mask(ids_TK: Any, num_experts: int) -> np.ndarray:
    """Boolean ``(T, E)``: True where the token chose the expert (``-1`` slots ignored)."""
    ids = _check_ids(ids_TK, num_experts)
    mask = np.zeros((ids.shape[0], num_experts + 1), dtype=bool)
    mask[np.arange(ids.shape[0])[:, None], np.where(ids >= 0, ids, num_experts)] = True
    return mask[:, :num_experts]


def coselection(ids_TK: Any, num_experts: int) -> np.ndarray:
    """Co-selection counts ``(E, E)`` int64: ``[i, j]`` = tokens that chose both ``i`` and ``j``;
    the diagonal holds how many tokens chose each expert."""
    ids = _check_ids(ids_TK, num_experts)
    E, K = num_experts, ids.shape[1]
    out = np.zeros(E * E, dtype=np.int64)
    step = max(1, (1 << 22) // max(K * K, 1))  # bounded (chunk, K, K) pair buffers
    for start in range(0, ids.shape[0], step):
        chunk = ids[start:start + step]
        pairs = chunk[:, :, None] * E + chunk[:, None, :]
        ok = (chunk[:, :, None] >= 0) & (chunk[:, None, :] >= 0)
        out += np.bincount(pairs[ok], minlength=E * E)
    return out.reshape(E, E)


def consecutive_counts(ids_BSK: Any, first_BS: Any, num_experts: int) -> tuple[int, int, int]:
    """Counts for the Mixtral Table 5 statistic over consecutive positions of each sequence.

    Args:
        ids_BSK: ``(B, S, K)`` chosen experts (-1 = unused slot).
        first_BS: ``(B, S)`` first-choice expert (-1 = none).
    Returns:
        ``(pairs, same_first, share_any)``: consecutive pairs where both tokens were routed, pairs
        with the same first choice, and pairs sharing at least one chosen expert.
    """
    ids = np.asarray(ids_BSK, dtype=np.int64)
    first = np.asarray(first_BS, dtype=np.int64)
    if ids.ndim != 3 or first.shape != ids.shape[:2]:
        raise ValueError(f"need ids_BSK (B, S, K) and first_BS (B, S), got {ids.shape} and {first.shape}")
    if ids.shape[1] < 2:
        return 0, 0, 0
    both = (first[:, :-1] >= 0) & (first[:, 1:] >= 0)
    same = both & (first[:, :-1] == first[:, 1:])
    mask = selection_mask(ids.reshape(-1, ids.shape[2]), num_experts).reshape(*ids.shape[:2], num_experts)
    share = both & (mask[:, :-1] & mask[:, 1:]).any(axis=-1)
    return int(both.sum()), int(same.sum()), int(share.sum())


def consecutive_rates(ids_BSK: Any, num_experts: int, weights_BSK: Any | None = None) -> tuple[float, float]:
    """``(same first choice rate, share-at-least-one rate)`` over consecutive tokens of ``ids_BSK``."""
    ids = np.asarray(ids_BSK)
    if ids.ndim != 3:
        raise ValueError(f"ids_BSK must be 3-D (B, S, K), got shape {ids.shape}")
    w = None if weights_BSK is None else np.asarray(weights_BSK).reshape(-1, ids.shape[2])
    first = first_choice(ids.reshape(-1, ids.shape[2]), w).reshape(ids.shape[:2])
    pairs, same, share = consecutive_counts(ids, first, num_experts)
    if pairs == 0:
        return float("nan"), float("nan")
    return same / pairs, share / pairs


def random_same_first_rate(num_experts: int) -> float:
    """Chance that two independent uniformly routed tokens have the same first choice: ``1 / E``."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return 1.0 / num_experts


def random_share_any_rate(num_experts: int, top_k: int) -> float:
    """Chance that two independent uniform top-``K`` sets share an expert: ``1 - C(E-K, K) / C(E, K)``
    (46.4% for E=8, K=2)."""
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
    return 1.0 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)


def pair_rates(ids_TK: Any, first_T: Any, num_experts: int) -> tuple[float, float]:
    """Load-aware baseline: the same two rates over all pairs of *distinct* tokens of a sample
    (tokens that are not neighbours), ``(same first, share any)``; NaN for fewer than 2 tokens."""
    first = np.asarray(first_T, dtype=np.int64)
    keep = first >= 0
    first = first[keep]
    n = first.size
    if n < 2:
        return float("nan"), float("nan")
    m = selection_mask(np.asarray(ids_TK)[keep], num_experts).astype(np.float64)
    pairs = n * (n - 1)
    f = np.bincount(first, minlength=num_experts).astype(np.float64)
    same = (f * (f - 1)).sum() / pairs
    overlap = (m @ m.T) > 0
    share = (overlap.sum() - n) / pairs
    return float(same), float(share)


# ----------------------------------------------------------------------------- per layer / overall


def layer_metrics(rec: LayerRecord) -> dict[str, Any]:
    """All metrics of one recorded layer as a flat JSON-friendly dict."""
    E = rec.num_experts
    pairs, same, share = rec.consecutive
    nan = float("nan")
    out: dict[str, Any] = {
        "layer": rec.name,
        "num_experts": E,
        "top_k": rec.top_k,
        "tokens": rec.num_tokens,
        "load_fraction": load_fractions(rec.choice_counts).tolist(),
        "load_cv": load_cv(rec.choice_counts),
        "max_mean_load": max_mean_load(rec.choice_counts),
        "dead_experts": dead_experts(rec.choice_counts),
        "dropped_fraction": rec.num_dropped / rec.num_slots if rec.num_slots else 0.0,
        "gate_entropy": rec.entropy_sum / rec.num_tokens if rec.num_tokens else nan,
        "gate_entropy_norm": (rec.entropy_sum / rec.num_tokens / math.log(E)
                              if rec.num_tokens and E > 1 else nan),
        "load_entropy_norm": load_entropy(rec.choice_counts),
        "effective_experts": effective_num_experts(rec.choice_counts),
        "consecutive_pairs": pairs,
        "same_first_rate": same / pairs if pairs else nan,
        "share_any_rate": share / pairs if pairs else nan,
        "same_first_baseline": random_same_first_rate(E),
        "share_any_baseline": random_share_any_rate(E, rec.top_k) if rec.fixed_k else nan,
    }
    ids, first = rec.reservoir()
    out["same_first_pair_baseline"], out["share_any_pair_baseline"] = pair_rates(ids, first, E)
    return out


_POOLED_MEANS = (
    "load_cv", "max_mean_load", "gate_entropy_norm", "load_entropy_norm", "effective_experts",
    "same_first_rate", "share_any_rate", "same_first_baseline", "share_any_baseline",
)


def overall_metrics(per_layer: list[dict[str, Any]]) -> dict[str, Any]:
    """Pool :func:`layer_metrics` dicts: means over layers of the rate-like metrics, totals of counts."""
    if not per_layer:
        raise ValueError("overall_metrics needs at least one layer")
    out: dict[str, Any] = {"layers": len(per_layer), "tokens": max(m["tokens"] for m in per_layer)}
    for key in _POOLED_MEANS:
        vals = np.array([m[key] for m in per_layer], dtype=np.float64)
        out[key] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    out["dead_experts"] = sum(len(m["dead_experts"]) for m in per_layer)
    out["dropped_fraction"] = float(np.mean([m["dropped_fraction"] for m in per_layer]))
    return out
