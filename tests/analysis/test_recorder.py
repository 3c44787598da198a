"""RoutingRecorder on a toy nn.Module holding moekit.MoE layers: streaming aggregates equal the
one-shot metrics over everything the layers returned."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import moekit
from moekit.analysis import metrics as M
from moekit.analysis.recorder import LayerRecord, RoutingRecorder, layer_index, layer_label
from moekit.core.config import MoEConfig


def run(model, batches, **kw):
    with RoutingRecorder(model, **kw) as rec:
        for ids in batches:
            rec.set_inputs(ids)
            model(ids)
    return rec


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 50, (3, 11), generator=g) for _ in range(4)]


@pytest.mark.parametrize("moe", [dict(num_experts=8, top_k=2), dict(num_experts=4, top_k=1, router="switch",
                                                                     capacity_factor=0.5)])
def test_streaming_aggregates_equal_one_shot_metrics(batches, moe, make_toy):
    model = make_toy(**moe)
    rec = run(model, batches, reservoir_size=64, sample_tokens=40)
    assert list(rec.records) == ["layers.0.mlp", "layers.2.mlp"]
    E, K = moe["num_experts"], moe["top_k"]
    for name, infos in model.seen.items():
        r = rec.records[name]
        ids = np.concatenate([i.expert_ids.numpy() for i in infos])
        w = np.concatenate([i.expert_weights.detach().numpy() for i in infos])
        logits = np.concatenate([i.router_logits.detach().numpy() for i in infos])
        first = M.first_choice(ids, w)
        assert (r.num_experts, r.top_k, r.num_tokens) == (E, K, 4 * 33)
        np.testing.assert_array_equal(r.choice_counts, np.bincount(ids[ids >= 0], minlength=E))
        np.testing.assert_array_equal(r.first_counts, np.bincount(first, minlength=E))
        np.testing.assert_array_equal(r.coselection, M.coselection(ids, E))
        np.testing.assert_array_equal(r.kept_counts, sum(i.tokens_per_expert.numpy() for i in infos))
        assert r.num_dropped == sum(int(i.dropped) for i in infos)
        assert r.entropy_sum == pytest.approx(M.gate_entropy(logits).sum(), rel=1e-6)
        # consecutive pairs stay inside each (B, S) sequence: 4 batches x 3 rows x 10 pairs
        pairs, same, share = M.consecutive_counts(ids.reshape(12, 11, K), first.reshape(12, 11), E)
        assert r.consecutive == (pairs, same, share) and pairs == 120
        tokens = torch.cat([b.reshape(-1) for b in batches]).numpy()
        ref = np.zeros((E, 50), dtype=np.int64)
        for t, row in zip(tokens, ids):
            for e in row[row >= 0]:
                ref[e, t] += 1
        np.testing.assert_array_equal(r.token_expert[:, :50], ref)
        assert r.token_expert[:, 50:].sum() == 0
        np.testing.assert_array_equal(r.token_counts[:50], np.bincount(tokens, minlength=50))
        assert r.token_counts.shape == (r.token_expert.shape[1],)
        assert r.sample_first == first[:40].tolist()
        res_ids, res_first = r.reservoir()
        assert res_ids.shape == (64, K) and set(res_first.tolist()) <= set(first.tolist())
        m = M.layer_metrics(r)
        assert m["load_cv"] == pytest.approx(M.load_cv(np.bincount(ids[ids >= 0], minlength=E)))
        if "capacity_factor" in moe:
            assert m["dropped_fraction"] > 0  # capacity 0.5 in training mode drops slots


def test_categories_and_dropped_counts_follow_set_inputs(batches, make_toy):
    model = make_toy()
    cats = [np.where(b.numpy() % 2 == 0, 1, -1) for b in batches]
    with RoutingRecorder(model) as rec:
        for ids, c in zip(batches, cats):
            rec.set_inputs(ids, c)
            model(ids)
    for name, infos in model.seen.items():
        first = np.concatenate([M.first_choice(i.expert_ids.numpy(), i.expert_weights.detach().numpy())
                                for i in infos])
        flat = np.concatenate([c.reshape(-1) for c in cats])
        table = rec.records[name].category_expert
        np.testing.assert_array_equal(table[1], np.bincount(first[flat == 1], minlength=8))
        assert table.sum() == (flat == 1).sum()


def test_reservoir_is_a_uniform_sample_of_the_stream():
    N, R, reps = 200, 20, 60
    hits = np.zeros(N)
    for rep in range(reps):
        rec = LayerRecord("x", num_experts=N, top_k=1, reservoir_size=R, seed=rep)
        for start in range(0, N, 25):  # the token's position in the stream is its expert id
            ids = np.arange(start, start + 25)[:, None]
            rec.update(ids, np.ones((25, 1)), np.zeros(25), np.zeros(N), 0, (1, 25))
        _, first = rec.reservoir()
        assert len(set(first.tolist())) == R
        hits[first] += 1
    # each token is kept with probability R/N, wherever it is in the stream: compare the quarters
    quarters = hits.reshape(4, -1).sum(axis=1)
    expected = reps * R / 4
    assert np.all(np.abs(quarters - expected) < 4 * np.sqrt(expected)), quarters


def test_hooks_are_removed_and_layer_selection(batches, make_toy):
    model = make_toy()
    rec = run(model, batches[:1], layers=[2])
    assert list(rec.records) == ["layers.2.mlp"]
    model(batches[0])  # after exit no hook records anything
    assert rec.records["layers.2.mlp"].num_tokens == 33
    with pytest.raises(ValueError, match=r"not MoE layers.*\[0, 2\]"):
        RoutingRecorder(model, layers=[1])
    with pytest.raises(ValueError, match="no moekit.MoE layer"):
        RoutingRecorder(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        RoutingRecorder("model")
    with pytest.raises(ValueError, match="token_ids_BS"):
        RoutingRecorder(model).set_inputs(np.zeros(3))


def test_keep_raw_returns_every_call(batches, make_toy):
    model = make_toy()
    rec = run(model, batches[:2], keep_raw=True)
    for name, infos in model.seen.items():
        assert len(rec.raw[name]) == 2
        for (ids, w, logits), info in zip(rec.raw[name], infos):
            np.testing.assert_array_equal(ids, info.expert_ids.numpy())
            np.testing.assert_array_equal(w, info.expert_weights.detach().numpy())
            np.testing.assert_array_equal(logits, info.router_logits.detach().numpy())
    assert run(model, batches[:1]).raw == {}


def test_without_set_inputs_uses_the_moe_input_shape(make_toy):
    model = make_toy()
    with RoutingRecorder(model) as rec:
        model(torch.randint(0, 50, (2, 7)))
    r = rec.records["layers.0.mlp"]
    assert r.consecutive[0] == 12 and r.token_expert.shape[1] == 0


def test_declared_inputs_hold_for_one_forward_only(make_toy):
    """A forward after the declared one, without set_inputs, records no token tables and takes its
    (B, S) from its own input, even when B * S matches; a declared count that does not match raises."""
    model = make_toy()
    with RoutingRecorder(model) as rec:
        rec.set_inputs(torch.full((2, 8), 7))
        model(torch.full((2, 8), 7))
        model(torch.full((4, 4), 9))
    r = rec.records["layers.0.mlp"]
    assert r.token_counts[7] == 16 and r.token_counts.sum() == 16
    assert r.consecutive[0] == 2 * 7 + 4 * 3
    with RoutingRecorder(model) as rec, pytest.raises(ValueError, match=r"routed 12 tokens.*\(2, 8\)"):
        rec.set_inputs(torch.zeros(2, 8, dtype=torch.long))
        model(torch.zeros(3, 4, dtype=torch.long))


def test_a_keyword_call_keeps_the_sequence_structure():
    moe = moekit.MoE(MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2))
    x = torch.randn(4, 8, 16)
    pairs = []
    for call in (lambda: moe(x), lambda: moe(x=x)):
        with RoutingRecorder(moe) as rec:
            call()
        pairs.append(rec.records[""].consecutive[0])
    assert pairs == [4 * 7, 4 * 7]


def test_expert_choice_routing_is_recorded(make_toy):
    model = make_toy(num_experts=4, router="expert_choice", capacity_factor=1.0)
    rec = run(model, [torch.randint(0, 50, (2, 8))])
    r = rec.records["layers.0.mlp"]
    assert r.top_k == 4 and not r.fixed_k
    assert r.choice_counts.sum() == r.num_slots
    assert np.isnan(M.layer_metrics(r)["share_any_baseline"])


def test_layer_names():
    assert layer_index("model.layers.12.mlp") == 12 and layer_label("model.layers.12.mlp") == "L12"
    assert layer_index("encoder.moe") is None and layer_label("encoder.moe") == "encoder.moe"


def test_memory_is_bounded_by_model_and_vocabulary_not_tokens(make_toy):
    """Aggregates of 2 and of 30 batches occupy the same memory (token x expert table at vocab size)."""
    model = make_toy()
    g = torch.Generator().manual_seed(1)
    sizes = []
    for n in (2, 30):
        batches = [torch.randint(0, 50, (4, 16), generator=g) for _ in range(n)]
        batches[0][0, 0] = 49  # the largest id appears in both runs
        rec = run(model, batches, reservoir_size=128, sample_tokens=64)
        r = rec.records["layers.0.mlp"]
        arrays = [r.choice_counts, r.kept_counts, r.first_counts, r.coselection, r.token_expert,
                  r.category_expert, *r.reservoir()]
        sizes.append((sum(a.nbytes for a in arrays), len(r.sample_first)))
    assert sizes[0] == sizes[1]


def test_an_empty_call_is_recorded_with_no_tokens():
    from moekit import MoE, MoEConfig

    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2)).eval()
    for shape in ((0, 16), (2, 0, 16)):
        with RoutingRecorder(moe) as rec, torch.no_grad():
            moe(torch.randn(*shape))
        assert rec.records[""].num_tokens == 0


def test_read_metrics_skips_a_torn_non_utf8_tail(tmp_path):
    from moekit.analysis.analyze import read_metrics

    torn = b'{"step": 1, "split": "train", "loss": 2.0}\n{"step": 2, "lo\xff\xfe'
    (tmp_path / "metrics.jsonl").write_bytes(torn)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
