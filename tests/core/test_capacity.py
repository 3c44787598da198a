"""Capacity, token dropping, dropless dispatch and expert choice."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.core.dispatch import Dispatcher, capacity_keep_mask
from moekit.core.reference import reference_keep_mask
from moekit.core.types import RouterOutput


def test_keep_mask_hand_computed():
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0], [0, 2]])
    kept = capacity_keep_mask(ids, None, num_experts=3, capacity=2)
    # first choices in token order take capacity first: e0 <- t0, t1; e1 <- t3; e2 <- t4;
    # then second choices: t0 -> e1 (2nd slot), t1 -> e2 (2nd slot); everything else overflows.
    expected = torch.tensor([[1, 1], [1, 1], [0, 0], [1, 0], [1, 0], [0, 0]], dtype=torch.bool)
    assert torch.equal(kept, expected)
    assert int((~kept).sum()) == 6


def test_keep_mask_priority_and_unused_slots():
    ids = torch.tensor([[0, -1], [0, 1], [0, -1]])
    priority = torch.tensor([[0.1, 0.0], [0.5, 0.9], [0.7, 0.0]])
    kept = capacity_keep_mask(ids, priority, num_experts=2, capacity=1)
    assert torch.equal(kept, torch.tensor([[0, 0], [0, 1], [1, 0]], dtype=torch.bool))
    assert torch.equal(capacity_keep_mask(ids, None, 2, None), ids >= 0)


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(0, 12), top_k=st.integers(1, 3), experts=st.integers(1, 5),
    capacity=st.one_of(st.none(), st.integers(1, 6)), use_priority=st.booleans(), seed=st.integers(0, 2**16),
)
def test_keep_mask_matches_python_loop(tokens, top_k, experts, capacity, use_priority, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, experts, (tokens, top_k), generator=gen)
    priority = torch.rand(tokens, top_k, generator=gen) if use_priority else None
    kept = capacity_keep_mask(ids, priority, experts, capacity)
    assert torch.equal(kept, reference_keep_mask(ids, priority, experts, capacity))
    counts = torch.bincount(ids[kept], minlength=experts)
    assert capacity is None or all(c <= capacity for c in counts.tolist())


def skewed_switch(capacity_factor: float | None) -> MoE:
    moe = MoE(MoEConfig(hidden_size=4, intermediate_size=8, num_experts=4, top_k=1, router="switch",
                        capacity_factor=capacity_factor)).train()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0  # every token with x[0] > 0 goes to expert 0
    return moe


def test_switch_drops_overflow_in_token_order_and_counts_it():
    moe = skewed_switch(capacity_factor=1.0)
    x = torch.rand(8, 4) + 0.5
    y, info = moe(x)
    capacity = moe.config.capacity(8, training=True)
    assert capacity == 2
    assert int(info.dropped) == 6
    assert info.tokens_per_expert.tolist() == [2, 0, 0, 0]
    assert info.kept[:, 0].tolist() == [True, True] + [False] * 6
    assert torch.count_nonzero(y[2:]) == 0  # dropped tokens contribute zero: the residual carries them
    assert torch.all(y[:2].abs().sum(-1) > 0)


def test_dropless_never_drops_even_when_skewed():
    moe = skewed_switch(capacity_factor=None)
    _, info = moe(torch.rand(64, 4) + 0.5)
    assert int(info.dropped) == 0 and info.tokens_per_expert.tolist() == [64, 0, 0, 0]
    assert bool(info.kept.all())


def test_capacity_is_the_exact_ceiling_of_the_decimal_product():
    """ceil(cf * T * K / E) of the factor as written: 1.1 * 100 / 10 is 11, not 12 (11.000000000000002)."""
    def config(router, factor, experts, top_k=1):
        return MoEConfig(hidden_size=4, intermediate_size=8, num_experts=experts, top_k=top_k, router=router,
                         capacity_factor=factor)
    assert config("switch", 1.1, 10).capacity(100, True) == 11
    assert config("topk", 2.2, 4).capacity(100, True) == 55
    assert config("gshard", 2.2, 4, top_k=2).capacity(100, True) == 110
    assert config("expert_choice", 1.1, 10).capacity(100, True) == 11
    assert config("switch", 1.25, 8).capacity(100, True) == 16  # 15.625 still rounds up
    assert config("switch", 1 / 3, 1).capacity(7, True) == 3


def test_eval_capacity_factor_applies_in_eval():
    moe = MoE(MoEConfig(hidden_size=4, intermediate_size=8, num_experts=4, top_k=1, router="switch",
                        capacity_factor=1.0, eval_capacity_factor=2.0))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 10.0
    x = torch.rand(8, 4) + 0.5
    assert int(moe.train()(x).routing.dropped) == 6
    assert int(moe.eval()(x).routing.dropped) == 4


def test_gshard_first_choices_take_capacity_before_second():
    moe = MoE(MoEConfig(hidden_size=3, intermediate_size=4, num_experts=3, top_k=2, router="gshard",
                        capacity_factor=0.75)).eval()
    with torch.no_grad():
        moe.gate.weight.copy_(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 1.0]]))
    # tokens 0-1 prefer e0 then e1; tokens 2-3 prefer e1 then e0
    x = torch.tensor([[1.0, 0.5, 0], [1.0, 0.5, 0], [0.5, 1.0, 0], [0.5, 1.0, 0]])
    _, info = moe(x)
    assert moe.config.capacity(4, training=False) == 2
    assert info.kept[:, 0].all() and not info.kept[:, 1].any()  # both experts full with first choices
    assert int(info.dropped) == 4


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    for tokens, factor in [(10, 1.0), (7, 2.0), (16, 0.5), (1, 1.0)]:
        moe = MoE(MoEConfig(hidden_size=6, intermediate_size=8, num_experts=4, router="expert_choice",
                            capacity_factor=factor))
        _, info = moe(torch.randn(tokens, 6))
        capacity = moe.config.capacity(tokens, training=True)
        assert info.tokens_per_expert.tolist() == [capacity] * 4
        assert int(info.dropped) == 0
        assert info.expert_ids.shape == (tokens, 4)


def test_expert_choice_breaks_ties_by_token_order():
    """One expert: every softmax score is 1.0, so the expert takes the first C tokens."""
    moe = MoE(MoEConfig(hidden_size=6, intermediate_size=8, num_experts=1, top_k=1, router="expert_choice",
                        capacity_factor=0.5))
    _, info = moe(torch.randn(64, 6))
    assert info.expert_ids[:, 0].tolist() == [0] * 32 + [-1] * 32


def test_dispatcher_round_trip_is_a_permutation():
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (9, 2))
    routing = RouterOutput(torch.ones(9, 2), ids, torch.zeros(9, 5), torch.zeros(9, 5))
    x = torch.randn(9, 3)
    dispatcher = Dispatcher(5)
    x_sd, counts, meta = dispatcher.dispatch(x, routing)
    assert counts.tolist() == torch.bincount(ids.reshape(-1), minlength=5).tolist()
    sorted_ids = ids.reshape(-1)[meta.slots_S]
    assert torch.equal(sorted_ids, torch.sort(sorted_ids).values)
    # identity experts: combine sums each token's K copies with weight 1
    torch.testing.assert_close(dispatcher.combine(x_sd, routing.weights_TK, meta), 2 * x)
