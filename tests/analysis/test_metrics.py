"""Routing metrics on synthetic routing with known answers, and against brute-force loops."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit.analysis import metrics as M


def random_topk(rng: np.random.Generator, T: int, E: int, K: int) -> np.ndarray:
    """``(T, K)`` independent uniform draws of K distinct experts per token."""
    return np.argsort(rng.random((T, E)), axis=1)[:, :K]


def test_uniform_routing_has_max_entropy_and_zero_cv():
    E, T = 8, 64
    logits = np.zeros((T, E))
    np.testing.assert_allclose(M.gate_entropy(logits), math.log(E))
    counts = np.full(E, 100)
    assert M.load_cv(counts) == 0.0
    assert M.max_mean_load(counts) == 1.0
    assert M.load_entropy(counts) == pytest.approx(1.0)
    assert M.load_entropy(counts, normalized=False) == pytest.approx(math.log(E))
    assert M.effective_num_experts(counts) == pytest.approx(E)
    assert M.dead_experts(counts) == []
    np.testing.assert_allclose(M.load_fractions(counts), 1 / E)


def test_fixed_expert_has_zero_entropy():
    E = 8
    logits = np.full((16, E), -1e4)
    logits[:, 3] = 0.0
    np.testing.assert_allclose(M.gate_entropy(logits), 0.0, atol=1e-12)
    counts = np.zeros(E)
    counts[3] = 500
    assert M.load_entropy(counts) == 0.0
    assert math.isnan(M.load_entropy([7]))  # one expert: undefined (null in metrics.json), not "collapsed"
    assert M.effective_num_experts(counts) == pytest.approx(1.0)
    assert M.max_mean_load(counts) == pytest.approx(E)
    assert M.load_cv(counts) == pytest.approx(math.sqrt(E - 1))
    assert M.dead_experts(counts) == [0, 1, 2, 4, 5, 6, 7]


def test_gate_entropy_matches_direct_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10, 6)) * 3
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(M.gate_entropy(z), -(p * np.log(p)).sum(1), rtol=1e-12)


def test_random_baselines_known_values():
    assert M.random_same_first_rate(8) == 0.125
    assert M.random_share_any_rate(8, 2) == pytest.approx(1 - 15 / 28)
    assert round(100 * M.random_share_any_rate(8, 2), 1) == 46.4
    assert M.random_share_any_rate(8, 1) == pytest.approx(1 / 8)
    assert M.random_share_any_rate(4, 3) == 1.0


@pytest.mark.parametrize("E,K", [(4, 1), (5, 2), (6, 3), (8, 2)])
def test_share_any_baseline_equals_enumeration(E, K):
    sets = list(itertools.combinations(range(E), K))
    share = np.mean([bool(set(a) & set(b)) for a in sets for b in sets])
    assert M.random_share_any_rate(E, K) == pytest.approx(share)


@pytest.mark.parametrize("E,K", [(8, 2), (16, 4), (4, 1)])
def test_independent_random_routing_hits_baselines(E, K):
    rng = np.random.default_rng(E * 10 + K)
    B, S = 50, 400
    ids = random_topk(rng, B * S, E, K).reshape(B, S, K)
    same, share = M.consecutive_rates(ids, E)
    n = B * (S - 1)
    for rate, base in ((same, M.random_same_first_rate(E)), (share, M.random_share_any_rate(E, K))):
        sigma = math.sqrt(base * (1 - base) / n)
        assert abs(rate - base) < 5 * sigma, (rate, base, sigma)


def test_sticky_routing_is_far_above_baseline():
    ids = np.repeat(np.array([[0, 1], [2, 3]]), 50, axis=0)[None]  # 50 tokens on (0,1), 50 on (2,3)
    same, share = M.consecutive_rates(ids, 4)
    assert same == pytest.approx(98 / 99) and share == pytest.approx(98 / 99)


def test_first_choice_uses_weights_and_skips_unused_slots():
    ids = np.array([[2, 5], [1, -1], [-1, -1], [-1, 4]])
    w = np.array([[0.3, 0.7], [0.9, 0.0], [0.0, 0.0], [0.0, 1.0]])
    assert M.first_choice(ids, w).tolist() == [5, 1, -1, 4]
    assert M.first_choice(ids).tolist() == [2, 1, -1, 4]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.integers(2, 6), st.integers(0, 10_000))
def test_coselection_and_consecutive_match_loops(B, S, E, seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(1, E + 1))
    ids = random_topk(rng, B * S, E, K)
    ids[rng.random(ids.shape) < 0.2] = -1  # unused slots, as expert choice produces
    cos = M.coselection(ids, E)
    ref = np.zeros((E, E), dtype=np.int64)
    for row in ids:
        chosen = {int(e) for e in row if e >= 0}
        for i in chosen:
            for j in chosen:
                ref[i, j] += 1
    np.testing.assert_array_equal(cos, ref)
    first = M.first_choice(ids).reshape(B, S)
    pairs, same, share = M.consecutive_counts(ids.reshape(B, S, K), first, E)
    rp = rs = rsh = 0
    for b in range(B):
        for s in range(S - 1):
            a, c = ids[b * S + s], ids[b * S + s + 1]
            fa, fc = first[b, s], first[b, s + 1]
            if fa < 0 or fc < 0:
                continue
            rp += 1
            rs += int(fa == fc)
            rsh += int(bool({e for e in a if e >= 0} & {e for e in c if e >= 0}))
    assert (pairs, same, share) == (rp, rs, rsh)


def test_pair_rates_match_loop():
    rng = np.random.default_rng(3)
    E, K = 6, 2
    ids = random_topk(rng, 40, E, K)
    first = M.first_choice(ids)
    same, share = M.pair_rates(ids, first, E)
    ps = pr = n = 0
    for i in range(40):
        for j in range(40):
            if i != j:
                n += 1
                ps += int(first[i] == first[j])
                pr += int(bool(set(ids[i]) & set(ids[j])))
    assert same == pytest.approx(ps / n) and share == pytest.approx(pr / n)


def test_pair_rates_of_independent_tokens_hit_uniform_baseline():
    rng = np.random.default_rng(5)
    ids = random_topk(rng, 3000, 8, 2)
    same, share = M.pair_rates(ids, M.first_choice(ids), 8)
    assert same == pytest.approx(1 / 8, abs=0.01)
    assert share == pytest.approx(1 - 15 / 28, abs=0.01)


def test_bad_input_raises_value_error_naming_the_field():
    with pytest.raises(ValueError, match="counts_E"):
        M.load_cv([])
    with pytest.raises(ValueError, match="counts_E"):
        M.load_cv([1, -1])
    with pytest.raises(ValueError, match="logits_TE"):
        M.gate_entropy(np.zeros(3))
    with pytest.raises(ValueError, match="num_experts"):
        M.coselection(np.array([[0, 5]]), 4)
    with pytest.raises(ValueError, match="top_k"):
        M.random_share_any_rate(4, 5)
    with pytest.raises(ValueError, match="min_fraction"):
        M.dead_experts([1, 2], min_fraction=-1)
    with pytest.raises(ValueError, match="at least one layer"):
        M.overall_metrics([])


def test_gate_entropy_of_masked_logits_is_finite():
    from moekit.analysis.metrics import gate_entropy

    logits = np.array([[0.0, 1.0, -np.inf, -np.inf], [0.0, 0.0, 0.0, 0.0]])
    p = np.exp([0.0, 1.0]) / np.exp([0.0, 1.0]).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "invalid value" RuntimeWarning on the way
        np.testing.assert_allclose(gate_entropy(logits), [-(p * np.log(p)).sum(), np.log(4)])


def test_distinctive_tokens_need_min_count_occurrences_not_slots():
    from moekit.analysis.specialization import top_tokens

    te = np.zeros((2, 3))
    te[:, 0] = 3  # token 0: 3 occurrences, top-2 -> 3 slots on each expert
    te[0, 1], te[1, 2] = 50, 50
    names = lambda v: f"t{v}"  # noqa: E731
    with_counts = top_tokens(te, names, min_count=5, token_counts_V=np.array([3, 50, 50]))
    assert all("t0" not in dict(e["distinctive"]) for e in with_counts)
    slots_only = top_tokens(te, names, min_count=5)  # 6 slots >= 5: counted without occurrences
    assert any("t0" in dict(e["distinctive"]) for e in slots_only)
