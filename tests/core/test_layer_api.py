"""Layer API: shapes, zero tokens, bad input, config errors, gradcheck, hypothesis vs the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.core.reference import reference_moe


def small(**overrides) -> MoE:
    fields = dict(hidden_size=6, intermediate_size=4, num_experts=3, top_k=2)
    fields.update(overrides)
    return MoE(MoEConfig(**fields))


@pytest.mark.parametrize("shape", [(6,), (2, 6), (2, 3, 6), (2, 1, 3, 6)])
def test_any_leading_shape(shape):
    moe = small()
    x = torch.randn(shape)
    y, info = moe(x)
    assert y.shape == x.shape
    tokens = x.numel() // 6
    assert info.router_logits.shape == (tokens, 3) and info.expert_ids.shape == (tokens, 2)
    assert info.expert_weights.shape == (tokens, 2) and info.kept.shape == (tokens, 2)
    assert info.tokens_per_expert.shape == (3,) and info.tokens_per_expert.dtype == torch.long


@pytest.mark.parametrize("router", ["topk", "expert_choice", "switch"])
@pytest.mark.parametrize("shape", [(0, 6), (2, 0, 6), (0, 0, 6)])
def test_zero_tokens_give_an_empty_output(shape, router):
    moe = small(router=router, top_k=1 if router == "switch" else 2)
    x = torch.randn(shape, requires_grad=True)
    y, info = moe(x)
    assert y.shape == shape and y.dtype == x.dtype
    assert int(info.dropped) == 0 and info.tokens_per_expert.tolist() == [0, 0, 0]
    assert float(info.aux_loss.detach()) == 0.0 and info.router_logits.shape == (0, 3)
    (y.sum() + info.aux_loss).backward()


def test_strided_inputs_give_contiguous_outputs_on_every_path():
    from moekit.kernels import cpu

    moe = MoE(MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2)).eval()
    for x in (torch.randn(16, 3).T, torch.randn(1, 1, 16).expand(4, 1, 16), torch.randn(40, 32)[:, ::2]):
        with torch.no_grad(), cpu.single_threaded_blas():  # the decode (slot) path for small batches
            y, _ = moe(x)
        torch.testing.assert_close(y, reference_moe(moe, x.contiguous())[0])
        assert y.is_contiguous() and y.shape == x.shape


def test_zero_tokens_routing_info_is_that_of_a_real_batch():
    x64 = torch.zeros(0, 6, dtype=torch.float64)
    for router, training, grad in [("topk", False, False), ("topk", True, True), ("noisy_topk", True, True)]:
        moe = small(router=router).double().train(training)
        with torch.set_grad_enabled(grad):
            empty = moe(x64).routing
            full = moe(torch.randn(3, 6, dtype=torch.float64)).routing
        assert set(empty.losses) == set(full.losses), router
        assert empty.router_logits.dtype == full.router_logits.dtype == torch.float64
        assert empty.expert_weights.dtype == full.expert_weights.dtype


def test_bad_input_is_rejected_with_the_field_named():
    moe = small()
    with pytest.raises(ValueError, match="hidden_size=6"):
        moe(torch.randn(3, 5))
    with pytest.raises(ValueError, match="hidden_size"):
        moe(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        moe(torch.ones(3, 6, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        moe([[0.0] * 6])
    with pytest.raises(TypeError, match="MoEConfig"):
        MoE({"hidden_size": 6})


@pytest.mark.parametrize("backend", ["grouped", "reference"])
def test_input_dtype_must_match_the_weights_outside_autocast(backend):
    moe = small(backend=backend)
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"input dtype torch.bfloat16 differs .*torch.float32.*autocast"):
        moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    y, _ = moe.to(torch.bfloat16)(x)
    assert y.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["grouped", "reference"])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("num_tokens", [2, 5, 40, 100])
@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_autocast_runs_the_experts_in_its_dtype_whatever_the_path(backend, training, num_tokens, in_dtype):
    """As nn.Linear under autocast: any float input, the products in bf16 (every path of the seam,
    no-grad batches included), within bf16 rounding of the float32 layer."""
    torch.manual_seed(num_tokens)
    moe = MoE(MoEConfig(hidden_size=64, intermediate_size=128, num_experts=8, top_k=2, backend=backend))
    moe.train(training)
    x = torch.randn(num_tokens, 64).to(in_dtype)
    with torch.no_grad():
        ref, _ = moe(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        y, _ = moe(x)
    assert y.dtype in (in_dtype, torch.bfloat16)
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.05)


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "sigmoid_bias"])
def test_router_stays_float32_under_autocast(router):
    """Selective precision: autocast lowers the experts, never the router (its choice is unchanged)."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(hidden_size=64, intermediate_size=32, num_experts=16, top_k=2, router=router)).eval()
    with torch.no_grad():
        moe.gate.weight.mul_(20)  # logits of size ~10: bf16 rounding (~0.03) would reorder experts
    x = torch.randn(256, 64)
    _, ref = moe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, info = moe(x)
    assert info.router_logits.dtype == info.expert_weights.dtype == torch.float32
    assert torch.equal(info.router_logits, ref.router_logits) and torch.equal(info.expert_ids, ref.expert_ids)


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"top_k": 4}, "top_k"), ({"top_k": 0}, "top_k"), ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"), ({"router": "hash"}, "router"),
        ({"backend": "cuda"}, "backend"), ({"activation": "tanh"}, "activation"),
        ({"router": "switch"}, "top_k"), ({"eval_capacity_factor": 0}, "eval_capacity_factor"),
        ({"n_group": 0}, "n_group must be an int >= 1"),
        ({"capacity_factor": "1"}, "capacity_factor must be a finite number"),
        ({"capacity_factor": float("inf")}, "capacity_factor must be a finite number"),
        ({"router_aux_loss_coef": float("nan")}, "router_aux_loss_coef must be a finite number >= 0"),
        ({"router_z_loss_coef": "x"}, "router_z_loss_coef"),
        ({"routed_scaling_factor": "a"}, "routed_scaling_factor must be a finite number > 0"),
        ({"norm_topk_prob": "no"}, "norm_topk_prob must be True or False"),
        ({"shared_expert_intermediate_size": 2.5}, "shared_expert_intermediate_size must be an int"),
        ({"topk_group": 5}, "topk_group must be 1 without groups"),
        ({"n_group": 3, "router": "topk"}, "n_group > 1 .* needs router='sigmoid_bias'"),
        ({"n_group": 3, "router": "sigmoid_bias"}, "groups of >= 2 experts"),
        ({"num_experts": 8, "n_group": 4, "topk_group": 5, "router": "sigmoid_bias"}, "topk_group must"),
        ({"num_experts": 8, "n_group": 4, "top_k": 3, "router": "sigmoid_bias"}, r"top_k \(3\) must be"),
    ],
)
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        small(**overrides)


def test_expert_choice_ignores_top_k():
    """top_k (default 2) is not checked against num_experts for expert_choice, which does not use it."""
    moe = MoE(MoEConfig(hidden_size=4, intermediate_size=4, num_experts=1, router="expert_choice"))
    y, info = moe(torch.randn(5, 4))
    assert y.shape == (5, 4) and info.tokens_per_expert.tolist() == [5]


def test_plain_mlp_state_dict_names_and_shapes():
    moe = small(activation="gelu", shared_expert_intermediate_size=5)
    shapes = {k: tuple(v.shape) for k, v in moe.state_dict().items()}
    assert shapes == {
        "gate.weight": (3, 6), "experts.up_proj": (3, 4, 6), "experts.down_proj": (3, 6, 4),
        "shared_expert.gate_proj.weight": (5, 6), "shared_expert.up_proj.weight": (5, 6),
        "shared_expert.down_proj.weight": (6, 5),
    }
    assert "gate.e_score_correction_bias" in small(router="sigmoid_bias").state_dict()
    assert "gate.noise_weight" in small(router="noisy_topk").state_dict()


GRADCHECK_CASES = [
    ("topk", True, {}), ("switch", True, {"top_k": 1, "capacity_factor": 1.0}),
    ("gshard", False, {"capacity_factor": 1.0}), ("noisy_topk", False, {}),
    ("expert_choice", True, {}), ("sigmoid_bias", True, {}),
]


@pytest.mark.parametrize("backend", ["reference", "grouped"])
@pytest.mark.parametrize("router,training,overrides", GRADCHECK_CASES)
def test_gradcheck(router, training, overrides, backend):
    torch.manual_seed(0)
    moe = small(router=router, backend=backend, hidden_size=3, intermediate_size=2, **overrides)
    moe = moe.double().train(training)
    names = [n for n, _ in moe.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in moe.parameters()]
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, *flat):
        y, info = torch.func.functional_call(moe, dict(zip(names, flat)), (x,))
        return y, info.aux_loss

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-6, fast_mode=True)


ROUTERS = ["topk", "noisy_topk", "switch", "gshard", "expert_choice", "sigmoid_bias"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    router=st.sampled_from(ROUTERS), backend=st.sampled_from(["reference", "grouped"]),
    experts=st.integers(1, 6), top_k=st.integers(1, 6), hidden=st.integers(1, 9), inter=st.integers(1, 9),
    lead=st.lists(st.integers(0, 4), min_size=0, max_size=3), training=st.booleans(),
    capacity=st.one_of(st.none(), st.floats(0.25, 2.0)),
    activation=st.sampled_from(["swiglu", "gelu", "relu"]),
    shared=st.integers(0, 5), seed=st.integers(0, 2**16),
)
def test_random_configs_match_the_reference(router, backend, experts, top_k, hidden, inter, lead, training,
                                            capacity, activation, shared, seed):
    top_k = {"switch": 1, "gshard": 2}.get(router, min(top_k, experts))
    if top_k > experts:
        return
    config = MoEConfig(hidden_size=hidden, intermediate_size=inter, num_experts=experts, top_k=top_k,
                       router=router, backend=backend, capacity_factor=capacity, activation=activation,
                       shared_expert_intermediate_size=shared, shared_expert_gate=shared % 2 == 1)
    torch.manual_seed(seed)
    moe = MoE(config).double().train(training)
    x = torch.randn(*lead, hidden, dtype=torch.float64)
    torch.manual_seed(seed + 1)
    y, info = moe(x)
    y_ref, ids, kept = reference_moe(moe, x, info, noise_seed=seed + 1)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(info.kept, kept)
    if capacity is None:
        assert int(info.dropped) == 0


def test_router_jitter_only_in_training():
    torch.manual_seed(0)
    moe = small(router="switch", top_k=1, router_jitter_noise=0.2)
    x = torch.randn(50, 6)
    clean = x @ moe.gate.weight.T
    _, info = moe.eval()(x)
    torch.testing.assert_close(info.router_logits, clean)
    _, info = moe.train()(x)
    assert not torch.allclose(info.router_logits, clean)
    quiet = small(router="switch", top_k=1)
    quiet.load_state_dict(moe.state_dict())
    torch.testing.assert_close(quiet.train()(x).routing.router_logits, clean)


@pytest.mark.parametrize("silu", [True, False])
def test_gated_activation_gradcheck(silu):
    from moekit.core.experts import _GatedActivation

    h = torch.randn(7, 10, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _GatedActivation.apply(t, silu), (h,))
    act = torch.nn.functional.silu if silu else torch.nn.functional.gelu
    torch.testing.assert_close(_GatedActivation.apply(h, silu), act(h[:, :5]) * h[:, 5:])
