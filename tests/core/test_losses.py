"""Router losses, micro-batch balance statistics and the aux-loss-free bias."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from moekit import MoE, MoEConfig
from moekit.core.losses import (
    BalanceStats,
    cv_squared,
    expert_counts,
    load_balancing_loss,
    noisy_topk_load,
    z_loss,
)
from moekit.core.reference import switch_loss_reference


def test_load_balancing_is_one_when_uniform_and_larger_when_skewed():
    probs = torch.full((12, 4), 0.25)
    ids = torch.arange(24).remainder(4).view(12, 2)
    assert float(load_balancing_loss(probs, expert_counts(ids, 4))) == pytest.approx(1.0)
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(12, 1)
    loss = load_balancing_loss(skewed, expert_counts(torch.zeros(12, 1, dtype=torch.long), 4))
    assert float(loss) == pytest.approx(4 * 0.7)


def test_load_balancing_matches_python_sums_and_ignores_unused_slots():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(9, 5, dtype=torch.float64), -1)
    ids = torch.randint(-1, 5, (9, 2))
    got = float(load_balancing_loss(probs, expert_counts(ids, 5)))
    assert got == pytest.approx(switch_loss_reference(probs, ids), rel=1e-12)


def test_z_loss_and_cv_squared():
    logits = torch.tensor([[0.0, math.log(3.0)], [1.0, 1.0]], dtype=torch.float64)
    expected = (math.log(4.0) ** 2 + (1 + math.log(2.0)) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(expected)
    assert float(cv_squared(torch.tensor([2.0, 2.0, 2.0]))) == pytest.approx(0.0)
    assert float(cv_squared(torch.tensor([1.0, 3.0]))) == pytest.approx(0.25)
    assert float(cv_squared(torch.tensor([5.0]))) == 0.0


def test_aux_loss_is_weighted_sum_of_losses():
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, router_aux_loss_coef=0.3,
                        router_z_loss_coef=0.02)).train()
    _, info = moe(torch.randn(10, 8))
    expected = 0.3 * info.losses["load_balancing"] + 0.02 * info.losses["z"]
    torch.testing.assert_close(info.aux_loss, expected)
    torch.testing.assert_close(info.losses["z"], z_loss(info.router_logits))
    noisy = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, router="noisy_topk",
                          router_aux_loss_coef=0.5)).train()
    _, info = noisy(torch.randn(10, 8))
    torch.testing.assert_close(info.aux_loss, 0.5 * (info.losses["importance"] + info.losses["load"]))
    info.aux_loss.backward()
    assert noisy.gate.noise_weight.grad is not None and noisy.gate.weight.grad.abs().sum() > 0
    # expert choice: every expert takes C slots, so the balance loss is the constant 1 and stays out
    chooser = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4, router="expert_choice",
                            router_aux_loss_coef=0.5, router_z_loss_coef=0.02)).train()
    _, info = chooser(torch.randn(10, 8))
    torch.testing.assert_close(info.losses["load_balancing"], torch.tensor(1.0))
    torch.testing.assert_close(info.aux_loss, 0.02 * info.losses["z"])


def test_noisy_topk_load_estimator_matches_monte_carlo():
    torch.manual_seed(0)
    clean = torch.randn(6, 5, dtype=torch.float64)
    std = torch.rand(6, 5, dtype=torch.float64) + 0.5
    draws, k = 4000, 2
    estimate = torch.zeros(5, dtype=torch.float64)
    frequency = torch.zeros(5, dtype=torch.float64)
    for _ in range(draws):
        noisy = clean + torch.randn_like(clean) * std
        estimate += noisy_topk_load(clean, noisy, std, k)
        frequency += expert_counts(torch.topk(noisy, k, -1).indices, 5).double()
    torch.testing.assert_close(estimate / draws, frequency / draws, rtol=0.05, atol=0.05)


def test_balance_stats_accumulate_micro_batches_like_the_full_batch():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=4)).train()
    x = torch.randn(30, 8)
    _, full = moe(x)
    moe.balance_stats = BalanceStats(4)
    moe(x[:13])
    _, second = moe(x[13:])
    torch.testing.assert_close(moe.balance_stats.counts_E, expert_counts(full.expert_ids, 4))
    # f covers both micro-batches, P only the second one
    probs = torch.softmax(second.router_logits, -1)
    expected = load_balancing_loss(probs, moe.balance_stats.counts_E)
    torch.testing.assert_close(second.losses["load_balancing"], expected)
    moe.balance_stats.reset()
    assert moe.balance_stats.counts_E is None


def test_balance_stats_and_bias_update_all_reduce_under_torch_distributed(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        stats = BalanceStats(3)
        stats.add(torch.tensor([1.0, 2.0, 3.0]))
        assert stats.add(torch.tensor([1.0, 0.0, 0.0])).tolist() == [2.0, 2.0, 3.0]
        moe = MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=3, top_k=1,
                            router="sigmoid_bias", bias_update_rate=0.5)).train()
        moe(torch.randn(7, 4))
        assert float(moe.update_bias().sum()) == 7.0
    finally:
        dist.destroy_process_group()


def load_cv(moe: MoE, x: torch.Tensor) -> float:
    with torch.no_grad():
        counts = moe.eval()(x).routing.tokens_per_expert.double()
    return float(counts.std(unbiased=False) / counts.mean())


def test_sigmoid_bias_updates_cut_load_cv_by_5x():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=8, top_k=2, router="sigmoid_bias",
                        bias_update_rate=0.01))
    skew = torch.zeros(16)
    skew[:4] = 1.5  # a shared direction in the inputs favours a few experts
    held_out = torch.randn(8192, 16) + skew
    before = load_cv(moe, held_out)
    stream = torch.randn(200, 512, 16) + skew
    moe.train()
    for step, x in enumerate(stream):
        with torch.no_grad():
            # the full layer now and then; the router alone (which counts the load) otherwise, for speed
            moe(x) if step % 50 == 0 else moe.gate(x)
        moe.update_bias()
    after = load_cv(moe, held_out)
    assert before > 0.3 and after * 5 <= before, (before, after)
    # the bias changes only the choice: the weights are the unbiased sigmoid scores
    moe.eval()
    _, info = moe(held_out[:5])
    scores = torch.sigmoid(info.router_logits).gather(1, info.expert_ids)
    torch.testing.assert_close(info.expert_weights, scores / scores.sum(-1, keepdim=True))


def test_update_bias_needs_the_sigmoid_router():
    with pytest.raises(ValueError, match="sigmoid_bias"):
        MoE(MoEConfig(hidden_size=4, intermediate_size=4)).update_bias()


def test_sigmoid_bias_buffers_stay_float32_under_model_casts():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=3, top_k=1, router="sigmoid_bias",
                        bias_update_rate=1e-3)).to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.bfloat16
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
    moe.gate.e_score_correction_bias.fill_(0.5)
    moe.train()(torch.randn(9, 4, dtype=torch.bfloat16))
    moe.update_bias()
    assert len(set(moe.gate.e_score_correction_bias.tolist())) > 1  # 0.5 +- 1e-3 survives


def test_sigmoid_bias_buffers_survive_meta_construction_and_to_empty():
    with torch.device("meta"):
        moe = MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=3, router="sigmoid_bias"))
    moe = moe.to_empty(device="cpu")
    assert moe.gate.e_score_correction_bias.device.type == "cpu"
    assert moe.gate.e_score_correction_bias.dtype == torch.float32
