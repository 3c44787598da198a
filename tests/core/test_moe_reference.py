"""Every router x backend against the plain dense float64 reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.core.reference import reference_moe

ROUTER_CASES = [
    ("topk", {"top_k": 2}),
    ("topk", {"top_k": 3, "norm_topk_prob": False}),
    ("noisy_topk", {"top_k": 2}),
    ("switch", {"top_k": 1, "capacity_factor": 1.0}),
    ("gshard", {"top_k": 2, "capacity_factor": 0.75}),
    ("expert_choice", {"capacity_factor": 1.5}),
    ("sigmoid_bias", {"top_k": 2}),
    ("sigmoid_bias", {"top_k": 3, "num_experts": 8, "n_group": 4, "topk_group": 2}),  # group-limited
]


def make(router: str, backend: str, seed: int = 0, **overrides) -> MoE:
    torch.manual_seed(seed)
    fields = dict(hidden_size=8, intermediate_size=12, num_experts=5, router=router, backend=backend)
    fields.update(overrides)
    moe = MoE(MoEConfig(**fields)).double()
    if router == "sigmoid_bias":  # a non-zero bias so that it matters for the choice
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, fields["num_experts"]))
    return moe


def grads(moe: MoE, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    weight = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    params = [p for p in moe.parameters()] + [x]
    return list(torch.autograd.grad((y * weight).sum(), params, allow_unused=True))


@pytest.mark.parametrize("backend", ["reference", "grouped"])
@pytest.mark.parametrize("router,overrides", ROUTER_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_matches_dense_reference(router, overrides, backend, training):
    moe = make(router, backend, **overrides)
    moe.train(training)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(123)
    y, info = moe(x)
    y_ref, ids_ref, kept_ref = reference_moe(moe, x, info, noise_seed=123)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(info.expert_ids, ids_ref)
    assert torch.equal(info.kept, kept_ref)
    assert int(info.dropped) == int((ids_ref >= 0).sum() - kept_ref.sum())
    assert info.tokens_per_expert.sum() == kept_ref.sum()
    for g, g_ref in zip(grads(moe, x, y), grads(moe, x, y_ref)):
        if g_ref is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["geglu", "gelu", "gelu_tanh", "relu", "silu"])
def test_activations_and_shared_expert(activation):
    moe = make("topk", "grouped", activation=activation, shared_expert_intermediate_size=6,
               shared_expert_gate=True, routed_scaling_factor=2.5)
    x = torch.randn(11, 8, dtype=torch.float64, requires_grad=True)
    y, info = moe(x)
    y_ref, _, _ = reference_moe(moe, x, info)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for g, g_ref in zip(grads(moe, x, y), grads(moe, x, y_ref)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
