"""Parity with transformers (test dependency only): Mixtral, Qwen2-MoE, DeepSeek-V3 blocks, balance loss."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.core.losses import expert_counts, load_balancing_loss

transformers = pytest.importorskip("transformers")
from transformers.models.mixtral.modeling_mixtral import (  # noqa: E402
    MixtralSparseMoeBlock,
    load_balancing_loss_func,
)
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402


def mixtral_block(impl: str, hidden=32, inter=48, experts=6, top_k=2) -> MixtralSparseMoeBlock:
    config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=inter,
                                        num_local_experts=experts, num_experts_per_tok=top_k)
    config._experts_implementation = impl
    block = MixtralSparseMoeBlock(config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    "impl,backend,num_tokens",
    # 1, 3: the small-batch slot path; 40: the dispatch path
    [("eager", "grouped", 1), ("eager", "grouped", 3), ("eager", "grouped", 40), ("eager", "reference", 3),
     ("grouped_mm", "grouped", 40)],
)
def test_mixtral_block_state_dict_and_output(impl, backend, num_tokens):
    torch.manual_seed(num_tokens)
    hf = mixtral_block(impl)
    config = MoEConfig(hidden_size=32, intermediate_size=48, num_experts=6, top_k=2, backend=backend)
    ours = MoE(config).eval()
    shapes = {k: v.shape for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(1, num_tokens, 32)
    with torch.no_grad():
        y_ref = hf(x)
        y, info = ours(x)
    assert rel_err(y, y_ref) <= 1e-5
    # and back: moekit's (re-initialised) weights load into transformers
    ours2 = MoE(ours.config)
    hf.load_state_dict(ours2.state_dict())
    with torch.no_grad():
        assert rel_err(ours2(x)[0], hf(x)) <= 1e-5


def test_mixtral_training_gradients_match():
    torch.manual_seed(0)
    hf = mixtral_block("eager").train()
    ours = MoE(MoEConfig(hidden_size=32, intermediate_size=48, num_experts=6, top_k=2)).train()
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, 32)
    grad = torch.randn(2, 9, 32)
    hf(x).backward(grad)
    ours(x).output.backward(grad)
    for (name, p), q in zip(ours.named_parameters(), hf.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, name


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balancing_loss_matches_transformers_up_to_top_k(top_k):
    torch.manual_seed(top_k)
    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=7, top_k=top_k)).train()
    x = torch.randn(50, 16) * 3
    _, info = moe(x)
    hf_loss = load_balancing_loss_func((info.router_logits,), num_experts=7, top_k=top_k)
    # documented normalisation: moekit divides the counts by slots (T*K), transformers by tokens (T)
    torch.testing.assert_close(info.losses["load_balancing"] * top_k, hf_loss, rtol=1e-6, atol=1e-7)
    # and the loss is the router's: recompute from its outputs
    probs = torch.softmax(info.router_logits, -1)
    torch.testing.assert_close(info.losses["load_balancing"],
                               load_balancing_loss(probs, expert_counts(info.expert_ids, 7)))


def test_qwen2_moe_shared_expert_parity():
    config = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=4,
                                         num_experts_per_tok=2, shared_expert_intermediate_size=40)
    config._experts_implementation = "eager"
    torch.manual_seed(1)
    hf = Qwen2MoeSparseMoeBlock(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = MoE(MoEConfig(hidden_size=32, intermediate_size=24, num_experts=4, top_k=2, norm_topk_prob=False,
                         shared_expert_intermediate_size=40, shared_expert_gate=True)).eval()
    assert set(ours.state_dict()) == set(hf.state_dict())
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        assert rel_err(ours(x)[0], hf(x)) <= 1e-5


@pytest.mark.parametrize("n_group,topk_group,norm,top_k",
                         [(4, 2, True, 3), (1, 1, False, 3), (1, 1, True, 1)])
def test_deepseek_v3_block_parity(n_group, topk_group, norm, top_k):
    """sigmoid_bias + group-limited routing + routed_scaling_factor + an ungated shared expert."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                           num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                                           n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=norm)
    config._experts_implementation = "eager"
    torch.manual_seed(2)
    hf = DeepseekV3MoE(config).eval()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    hf.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.3, 8))  # a bias that changes choices
    ours = MoE(MoEConfig(hidden_size=32, intermediate_size=16, num_experts=8, top_k=top_k,
                         router="sigmoid_bias", norm_topk_prob=norm, n_group=n_group, topk_group=topk_group,
                         routed_scaling_factor=2.5, shared_expert_intermediate_size=32)).eval()
    state = {k.replace("shared_experts.", "shared_expert."): v for k, v in hf.state_dict().items()}
    assert set(ours.state_dict()) == set(state)
    ours.load_state_dict(state)
    x = torch.randn(4, 9, 32)
    with torch.no_grad():
        y, info = ours(x)
        _, _, hf_ids = hf.gate(x)
        assert rel_err(y, hf(x)) <= 1e-5
    assert torch.equal(info.expert_ids.sort(-1).values, hf_ids.sort(-1).values)
    if n_group > 1:  # every token's experts lie in at most topk_group of the 4 groups
        assert all(len(set((row // 2).tolist())) <= topk_group for row in info.expert_ids)
