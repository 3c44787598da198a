"""The grouped-matmul seam: every backend and strategy agrees with the reference loop."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.kernels import available_backends, grouped_mm, register_backend
from moekit.kernels.grouped import grouped_mm_gathered, grouped_mm_loop, grouped_mm_supported
from moekit.kernels.reference import grouped_mm_reference

STRATEGIES = {"gathered": grouped_mm_gathered, "loop": grouped_mm_loop, "grouped": lambda *a: grouped_mm(*a)}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [0, 0, 0, 0], [0, 70, 0, 2], [1, 0, 0, 0]])
def test_strategies_match_reference_forward_and_backward(strategy, counts):
    torch.manual_seed(len(counts) + sum(counts))
    counts_e = torch.tensor(counts)
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(4, 24, 16, requires_grad=True)
    grad = torch.randn(sum(counts), 24)
    y = STRATEGIES[strategy](x, w, counts_e)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = grouped_mm_reference(x2, w2, counts_e)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    if sum(counts):
        y.backward(grad)
        y_ref.backward(grad)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-5, atol=1e-5)


def test_torch_grouped_mm_is_used_where_supported():
    x, w = torch.randn(80, 16), torch.randn(4, 24, 16)
    assert grouped_mm_supported(x, w) == hasattr(torch.nn.functional, "grouped_mm")
    assert not grouped_mm_supported(x.double(), w.double())  # float64 takes the loop
    assert not grouped_mm_supported(torch.randn(80, 5), torch.randn(4, 24, 5))  # 20-byte rows


def test_grouped_takes_any_strides_the_reference_takes():
    """Expanded (stride 0) rows, a one-row input with two unit strides and weights whose unit stride
    is the expert dimension: grouped_mm refuses them, so the seam takes its loop."""
    torch.manual_seed(0)
    dense = torch.randn(4, 16, 32, requires_grad=True)
    expert_minor = torch.randn(16, 32, 4).permute(2, 0, 1).detach().requires_grad_()  # unit stride on E
    for x, w, counts in ((torch.randn(1, 32).expand(100, 32), dense, [20, 20, 20, 40]),
                         (torch.randn(32, 1).T, dense, [0, 1, 0, 0]),
                         (torch.randn(100, 32), expert_minor, [20, 20, 20, 40])):
        x = x.detach().requires_grad_()
        assert not grouped_mm_supported(x, w)
        counts = torch.tensor(counts)
        y, ref = grouped_mm(x, w, counts, "grouped"), grouped_mm_reference(x, w, counts)
        torch.testing.assert_close(y, ref)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(ref.sum(), x)
        torch.testing.assert_close(gx, gx_ref)


def test_grouped_trains_with_output_rows_that_are_not_16_byte_multiples():
    """A 5-wide output (20-byte rows): grouped_mm's backward refuses it, so the seam takes its loop."""
    torch.manual_seed(0)
    x, w = torch.randn(80, 16, requires_grad=True), torch.randn(4, 5, 16, requires_grad=True)
    counts = torch.tensor([30, 0, 40, 10])
    assert not grouped_mm_supported(x, w)
    y, ref = grouped_mm(x, w, counts, "grouped"), grouped_mm_reference(x, w, counts)
    torch.testing.assert_close(y, ref)
    for got, want in zip(torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(ref.sum(), (x, w))):
        torch.testing.assert_close(got, want)


def test_register_backend_plugs_into_the_layer():
    calls = []

    def counting(x, w, counts):
        calls.append(x.shape[0])
        return grouped_mm_reference(x, w, counts)

    register_backend("counting_test", counting)
    assert "counting_test" in available_backends()
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=8, num_experts=3, backend="counting_test"))
    y, _ = moe(torch.randn(5, 8))
    assert calls == [10, 10]  # gate_up and down over T*K rows
    with pytest.raises(ValueError, match="register_backend"):
        MoEConfig(hidden_size=8, intermediate_size=8, num_experts=3, backend="not_registered")
    with pytest.raises(ValueError, match="backend must be one of"):
        grouped_mm(torch.randn(2, 8), torch.randn(3, 8, 8), torch.tensor([2, 0, 0]), backend="nope")
    with pytest.raises(TypeError, match="callable"):
        register_backend("bad", 3)


@pytest.mark.parametrize("num_tokens", [1, 2, 4, 5, 40])
@pytest.mark.parametrize("grad_enabled", [False, True])
def test_fast_paths_agree_with_reference_backend(num_tokens, grad_enabled):
    """T*K <= 8 takes the CPU slot path, larger T the dispatch path; both against the reference loop."""
    torch.manual_seed(num_tokens)
    config = MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2,
                       routed_scaling_factor=1.5, shared_expert_intermediate_size=8, shared_expert_gate=True)
    fast = MoE(config).double().eval()
    ref = MoE(dataclasses.replace(config, backend="reference")).double().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(num_tokens, 16, dtype=torch.float64, requires_grad=grad_enabled)
    with torch.set_grad_enabled(grad_enabled):
        y, info = fast(x)
        y_ref, info_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(info.tokens_per_expert, info_ref.tokens_per_expert)
    if grad_enabled:
        g = torch.autograd.grad(y.square().sum(), [x, *fast.parameters()])
        g_ref = torch.autograd.grad(y_ref.square().sum(), [x, *ref.parameters()])
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        assert info.losses == {} and float(info.aux_loss) == 0.0  # inference skips the loss math


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_inference_slot_path_matches_reference_for_every_activation(activation, num_tokens):
    """Without autograd, float64 (torch's products, each slot's weight folded into its down
    projection, rows accumulated in place) against the reference loop, gated and plain experts."""
    torch.manual_seed(num_tokens)
    config = MoEConfig(hidden_size=12, intermediate_size=10, num_experts=5, top_k=2, activation=activation)
    fast = MoE(config).double().eval()
    ref = MoE(dataclasses.replace(config, backend="reference")).double().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(num_tokens, 12, dtype=torch.float64)
    with torch.no_grad():
        routing = fast.gate(x)
        y_slots = fast.experts.forward_slots(x, routing.ids_TK, routing.weights_TK)
        y, _ = fast(x)
        y_ref, _ = ref(x)
    torch.testing.assert_close(y_slots, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_slot_path_gradients_match_dispatch_path(activation):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=8, intermediate_size=6, num_experts=5, top_k=2, activation=activation))
    moe = moe.double()
    x = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    routing = moe.gate(x)
    y_slots = moe.experts.forward_slots(x, routing.ids_TK, routing.weights_TK)
    x_sd, counts, meta = moe.dispatcher.dispatch(x, routing)
    y_ref = moe.dispatcher.combine(moe.experts(x_sd, counts), routing.weights_TK, meta)
    torch.testing.assert_close(y_slots, y_ref, rtol=1e-12, atol=1e-12)
    params = [x, *moe.parameters()]
    for a, b in zip(torch.autograd.grad(y_slots.sum(), params, allow_unused=True, retain_graph=True),
                    torch.autograd.grad(y_ref.sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_float32_grouped_mm_path_matches_float64_reference():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=32, intermediate_size=64, num_experts=8, top_k=2)).train()
    x = torch.randn(100, 32)
    y, _ = moe(x)
    moe64 = MoE(MoEConfig(hidden_size=32, intermediate_size=64, num_experts=8, top_k=2, backend="reference"))
    moe64 = moe64.double().train()
    moe64.load_state_dict(moe.state_dict())
    y64, _ = moe64(x.double())
    assert float((y.detach().double() - y64.detach()).norm() / y64.detach().norm()) < 1e-5


def test_bfloat16_model_keeps_router_in_float32():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=32, num_experts=4, top_k=2))
    moe32 = MoE(moe.config)
    moe32.load_state_dict(moe.state_dict())
    moe = moe.to(torch.bfloat16)
    x = torch.randn(20, 16)
    y, info = moe(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert info.router_logits.dtype == torch.float32 and info.expert_weights.dtype == torch.float32
    y32, info32 = moe32(x)
    assert torch.equal(info.expert_ids, info32.expert_ids)
    assert float((y.detach().float() - y32.detach()).norm() / y32.detach().norm()) < 3e-2
