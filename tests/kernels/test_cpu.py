"""The fast float32 CPU paths (moekit.kernels.cpu: oneDNN, OpenBLAS) against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE, MoEConfig
from moekit.kernels import cpu, group_padding
from moekit.kernels.reference import grouped_mm_reference

HAS_OP = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
pytestmark = pytest.mark.skipif(not HAS_OP, reason="this torch has no oneDNN linear op")
HAS_OPENBLAS = cpu._numpy_openblas() is not None
needs_openblas = pytest.mark.skipif(not HAS_OPENBLAS, reason="numpy's BLAS is not OpenBLAS")


@pytest.fixture
def forced(monkeypatch):
    """The fast paths on whatever the CPU (by default only where they were measured faster), and
    oneDNN for every product size (the tests' products are small)."""
    monkeypatch.setattr(cpu, "enabled", lambda: True)
    monkeypatch.setattr(cpu, "matvec_enabled", lambda: True)
    monkeypatch.setattr(cpu, "ONEDNN_MIN_MACS", 0)


@pytest.fixture
def matvec(forced, monkeypatch):
    """Also the OpenBLAS matrix-vector path (numpy's OpenBLAS on one thread), for any weight size."""
    if not HAS_OPENBLAS:
        pytest.skip("numpy's BLAS is not OpenBLAS")
    monkeypatch.setattr(cpu, "MATVEC_MIN_WEIGHT", 0)
    with cpu.single_threaded_blas():
        assert cpu.matvec_ready()
        yield


# The experts' three fast feed-forward paths, by (BATCHED_MAX_ROWS, FFN_MIN_ROWS).
FFN_PATHS = {"batched_ffn": (1 << 30, 1 << 30), "expert_ffn": (0, 0), "two_grouped_mm": (0, 1 << 30)}


@pytest.fixture(params=list(FFN_PATHS))
def ffn_path(request, monkeypatch):
    """Every routed-expert group through one of Experts.forward's fast paths, whatever its size
    (batched_ffn: as long as its padding at most doubles the rows)."""
    batched_max_rows, ffn_min_rows = FFN_PATHS[request.param]
    monkeypatch.setattr(cpu, "BATCHED_MAX_ROWS", batched_max_rows)
    monkeypatch.setattr(cpu, "FFN_MIN_ROWS", ffn_min_rows)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)


def close64(actual, expected):
    """float32 result vs float64 reference: relative to the reference's size (at least 1)."""
    assert actual.shape == expected.shape
    if expected.numel() == 0:
        return
    err = (actual.double() - expected).abs().max().item()
    assert err <= 2e-5 * max(1.0, expected.abs().max().item()), err


@pytest.mark.parametrize("shape", [(40, 24), (3, 17, 24), (5, 24), (64, 1), (1, 1, 24), (2, 3, 24)])
@pytest.mark.parametrize("bias", [False, True, "strided"])
def test_linear_forward_and_gradients_match_float64(matvec, shape, bias):
    torch.manual_seed(sum(shape))
    in_features = shape[-1]
    x = torch.randn(*shape, requires_grad=True)
    w = torch.randn(33, in_features, requires_grad=True)
    b = None if not bias else torch.randn(33) if bias is True else torch.randn(66)[::2]  # half a fused one
    if b is not None:
        b.requires_grad_()
    y = cpu.linear(x, w, b)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    assert y.shape == y64.shape and y.dtype == torch.float32
    close64(y, y64)
    g = torch.randn(y.shape, dtype=torch.float64)
    y.backward(g.float())
    y64.backward(g)
    close64(x.grad, x64.grad)
    close64(w.grad, w64.grad)
    if bias:
        close64(b.grad, b64.grad)
    with torch.no_grad():  # without autograd: matrix-vector products for few rows
        close64(cpu.linear(x, w, b), y64.detach())


@pytest.mark.parametrize("rows", [1, 64])
def test_linear_follows_autocast_like_f_linear(forced, rows):
    x, w = torch.randn(rows, 24, requires_grad=True), torch.randn(33, 24)
    for grad in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(grad):
            y, ref = cpu.linear(x, w), torch.nn.functional.linear(x, w)
        assert y.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(y, ref)


@needs_openblas
def test_paths_by_size_and_autograd(monkeypatch):
    monkeypatch.setattr(cpu, "enabled", lambda: True)
    monkeypatch.setattr(cpu, "matvec_enabled", lambda: True)
    calls = []
    real_mm_t, real_gemv = cpu._mm_t, cpu.gemv_rows
    monkeypatch.setattr(cpu, "_mm_t", lambda x, w: calls.append(("onednn", x.shape[0])) or real_mm_t(x, w))
    monkeypatch.setattr(cpu, "gemv_rows", lambda x, w: calls.append(("gemv", x.shape[0])) or real_gemv(x, w))
    big, mid, small = torch.randn(1024, 256), torch.randn(64, 256), torch.randn(16, 8)
    assert mid.numel() == cpu.MATVEC_MIN_WEIGHT
    cpu.linear(torch.randn(8, 256), big)  # 2 M multiply-adds: oneDNN
    cpu.linear(torch.randn(8, 8), small)  # small product: torch
    with torch.no_grad():
        cpu.linear(torch.randn(2, 256), mid)  # decode rows, OpenBLAS multi-threaded: not yet
        with cpu.single_threaded_blas():
            cpu.linear(torch.randn(2, 256), mid)
            cpu.linear(torch.randn(4, 256), mid)  # 4 rows: no longer matrix-vector
            cpu.linear(torch.randn(1, 8), small)  # a small weight: torch
    with cpu.single_threaded_blas():
        cpu.linear(torch.randn(1, 256, requires_grad=True), mid)  # autograd: torch
    cpu.linear(torch.randn(8, 256, dtype=torch.float64), big.double())
    expected = [("onednn", 8), ("gemv", 2)] if cpu._numpy_openblas().get_num_threads() > 1 else [
        ("onednn", 8), ("gemv", 2), ("gemv", 2)]
    assert calls == expected
    monkeypatch.setattr(cpu, "enabled", lambda: False)
    cpu.linear(torch.randn(8, 256), big)
    assert calls == expected
    # The matrix-vector path alone (AVX2 CPUs): few rows without autograd only, never oneDNN.
    with torch.no_grad(), cpu.single_threaded_blas():
        cpu.linear(torch.randn(8, 256), big)
        cpu.linear(torch.randn(1, 8), small)
        y = cpu.linear(torch.randn(2, 256), mid, torch.ones(64))
    cpu.linear(torch.randn(1, 256, requires_grad=True), mid)
    assert calls == [*expected, ("gemv", 2)] and y.shape == (2, 64)
    monkeypatch.setattr(cpu, "matvec_enabled", lambda: False)
    with torch.no_grad(), cpu.single_threaded_blas():
        assert not cpu.matvec_ready()
        cpu.linear(torch.randn(2, 256), mid)
    assert calls == [*expected, ("gemv", 2)]


@pytest.mark.parametrize(("capability", "vendor", "forced", "onednn", "matvec"), [
    ("AVX512", "AuthenticAMD", "", True, True),  # Zen 4 / Zen 5: both measured faster
    ("AVX2", "AuthenticAMD", "", False, True),  # Zen 2: oneDNN no faster than MKL, OpenBLAS gemv is
    ("AVX512", "GenuineIntel", "", False, False),  # MKL's own code
    ("AVX2", "GenuineIntel", "", False, False),
    ("DEFAULT", "", "", False, False),  # not x86 (or unknown): unmeasured
    ("AVX2", "AuthenticAMD", "fast", True, True),
    ("AVX512", "AuthenticAMD", "torch", False, False),
])
def test_which_cpus_take_the_fast_paths(monkeypatch, capability, vendor, forced, onednn, matvec):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(cpu, "_cpu_vendor", lambda: vendor)
    monkeypatch.setenv("MOEKIT_CPU_MATMUL", forced)
    assert cpu.enabled.__wrapped__() is onednn
    monkeypatch.setattr(cpu, "enabled", cpu.enabled.__wrapped__)  # matvec_enabled's own call, uncached
    assert cpu.matvec_enabled.__wrapped__() is matvec


@needs_openblas
def test_single_threaded_blas_restores_the_thread_count():
    lib = cpu._numpy_openblas()
    before = lib.get_num_threads()
    with cpu.single_threaded_blas():
        assert lib.get_num_threads() == 1 or not cpu.matvec_enabled()
    assert lib.get_num_threads() == before


def test_gemv_rows_match_and_take_strided_views():
    w = torch.randn(40, 24)
    x = torch.randn(3, 24)
    close64(cpu.gemv_rows(x, w), x.double() @ w.double().T)
    close64(cpu.gemv_rows(x[:1], w[::2]), x[:1].double() @ w[::2].double().T)
    close64(cpu.gemv_rows(x[:, ::2], w[:, ::2]), x[:, ::2].double() @ w[:, ::2].double().T)


COUNTS = [[3, 0, 40, 9], [0, 0, 0, 0], [16, 16, 16, 16], [1, 0, 0, 70], [2, 1, 3, 1]]


@pytest.mark.parametrize("counts", COUNTS)
def test_grouped_mm_matches_reference_forward_and_backward(matvec, counts):
    torch.manual_seed(sum(counts))
    counts_e = torch.tensor(counts)
    x = torch.randn(sum(counts), 20, requires_grad=True)
    w = torch.randn(4, 36, 20, requires_grad=True)
    y = cpu.grouped_mm_cpu(x, w, counts_e)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = grouped_mm_reference(x64, w64, counts_e)
    close64(y, y64)
    if sum(counts):
        g = torch.randn(y.shape, dtype=torch.float64)
        y.backward(g.float())
        y64.backward(g)
        close64(x.grad, x64.grad)
        close64(w.grad, w64.grad)
        assert torch.all(w.grad[torch.tensor(counts) == 0] == 0)
    with torch.no_grad():
        close64(cpu.grouped_mm_cpu(x, w, counts_e), y64.detach())


@needs_openblas
def test_grouped_backend_takes_the_matvec_path_alone_for_small_inference_batches(monkeypatch):
    """AVX2 CPUs (matvec_enabled without enabled): inference groups of <= 3 rows on OpenBLAS, the
    others on torch, never oneDNN; with autograd or from CPU_GROUPED_MM_MIN_ROWS rows, torch's paths."""
    from moekit.kernels import grouped_mm
    from moekit.kernels.grouped import CPU_GROUPED_MM_MIN_ROWS

    monkeypatch.setattr(cpu, "enabled", lambda: False)
    monkeypatch.setattr(cpu, "matvec_enabled", lambda: True)
    monkeypatch.setattr(cpu, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(cpu, "_mm_t", lambda x, w: pytest.fail("oneDNN without enabled()"))
    groups = []
    real = cpu._grouped_forward
    monkeypatch.setattr(cpu, "_grouped_forward", lambda x, w, g: groups.append(g) or real(x, w, g))
    counts = torch.tensor([1, 0, 3, 5])
    x, w = torch.randn(9, 20), torch.randn(4, 36, 20)
    with torch.no_grad(), cpu.single_threaded_blas():
        y = grouped_mm(x, w, counts)
        rows = CPU_GROUPED_MM_MIN_ROWS
        grouped_mm(torch.randn(rows, 20), w, torch.tensor([rows, 0, 0, 0]))
    with cpu.single_threaded_blas():
        grouped_mm(x.requires_grad_(), w, counts)
    assert groups == [[(0, 0, 1), (2, 1, 4), (3, 4, 9)]]
    close64(y, grouped_mm_reference(x.detach().double(), w.double(), counts))


def _ffn64(x, w_in, w_down, counts, activation):
    """float64 reference of the experts' feed-forward: two reference grouped matmuls around the act."""
    h = grouped_mm_reference(x, w_in, counts)
    if activation == "swiglu":
        a = torch.nn.functional.silu(h[:, : w_down.shape[2]]) * h[:, w_down.shape[2] :]
    else:
        a = torch.nn.functional.gelu(h)
    return grouped_mm_reference(a, w_down, counts)


@pytest.mark.parametrize("ffn", ["expert_ffn", "batched_ffn"])
@pytest.mark.parametrize("counts", COUNTS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True)])
def test_expert_ffn_matches_reference_forward_and_backward(matvec, ffn, counts, activation, wants):
    from moekit.core.experts import Experts

    torch.manual_seed(sum(counts) + len(activation))
    counts_e = torch.tensor(counts)
    experts = Experts(MoEConfig(hidden_size=20, intermediate_size=12, num_experts=4, top_k=2,
                                activation=activation))
    w_in, w_down = experts.in_proj.detach().clone(), experts.down_proj.detach().clone()
    x = torch.randn(sum(counts), 20)
    for t, want in zip((x, w_in, w_down), wants):
        t.requires_grad_(want)
    ffn = getattr(cpu, ffn)
    y = ffn(x, w_in, w_down, counts_e, experts._activate)
    leaves64 = [t.detach().double().requires_grad_(want) for t, want in zip((x, w_in, w_down), wants)]
    y64 = _ffn64(*leaves64, counts_e, activation)
    close64(y, y64)
    if sum(counts):
        g = torch.randn(y.shape, dtype=torch.float64)
        y.backward(g.float())
        y64.backward(g)
        for t, t64, want in zip((x, w_in, w_down), leaves64, wants):
            assert (t.grad is not None) == want
            if want:
                close64(t.grad, t64.grad)
        for w in (w_in, w_down):
            if w.requires_grad:
                assert torch.all(w.grad[counts_e == 0] == 0)
    with torch.no_grad():
        close64(ffn(x, w_in, w_down, counts_e, experts._activate), y64.detach())


@given(rows=st.integers(0, 1 << 20))
@settings(max_examples=300, deadline=None)
def test_bucket_rows_bounds(rows):
    padded = cpu.bucket_rows(rows)
    assert padded >= rows
    assert padded == rows if rows < cpu.PAD_MIN_ROWS else padded % 8 == 0
    assert padded - rows <= max(7, rows // 16)
    assert cpu.bucket_rows(padded) == padded
    assert cpu.bucket_rows(rows + 1) >= padded


def test_bucket_rows_few_shapes_per_octave():
    assert len({cpu.bucket_rows(r) for r in range(513, 1025)}) == 16  # 544, 576, ..., 1024


@pytest.mark.parametrize("router,capacity_factor", [("topk", None), ("switch", 1.0), ("gshard", 1.25),
                                                    ("expert_choice", None)])
@pytest.mark.parametrize("training", [False, True])
def test_padded_dispatch_equals_unpadded(router, capacity_factor, training):
    """Padding every expert's group (zero rows) changes neither the output nor any gradient."""
    torch.manual_seed(0)
    top_k = 1 if router == "switch" else 2
    config = MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, top_k=top_k, router=router,
                       capacity_factor=capacity_factor)
    plain = MoE(config).double().train(training)
    padded = MoE(config).double().train(training)
    padded.load_state_dict(plain.state_dict())
    padded.dispatcher.group_padding = lambda x: (lambda rows: cpu.bucket_rows(rows) + 8 * (rows > 0))
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y, info = plain(x)
    torch.manual_seed(1)
    y2, info2 = padded(x2)
    torch.testing.assert_close(y2, y, rtol=1e-12, atol=1e-12)
    assert torch.equal(info2.tokens_per_expert, info.tokens_per_expert)
    assert torch.equal(info2.dropped, info.dropped)
    (y.square().sum() + info.aux_loss).backward()
    (y2.square().sum() + info2.aux_loss).backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-12, atol=1e-12)
    for (name, p), p2 in zip(plain.named_parameters(), padded.parameters()):
        torch.testing.assert_close(p2.grad, p.grad, rtol=1e-12, atol=1e-12, msg=name)


def test_group_padding_policy(forced):
    x = torch.randn(4, 8)
    assert group_padding("grouped", x) is cpu.bucket_rows
    assert group_padding("reference", x) is None
    assert group_padding("grouped", x.double()) is None


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
@pytest.mark.parametrize("ffn_path", ["expert_ffn", "two_grouped_mm"], indirect=True)  # batched: no autograd
def test_float32_layer_on_fast_paths_matches_float64_reference_backend(forced, ffn_path, router):
    torch.manual_seed(2)
    top_k = 1 if router == "switch" else 2
    config = MoEConfig(hidden_size=32, intermediate_size=48, num_experts=4, top_k=top_k, router=router,
                       capacity_factor=1.5 if router == "switch" else None,
                       shared_expert_intermediate_size=16)
    fast = MoE(config).train()
    ref = MoE(MoEConfig(**{**vars(config), "backend": "reference"})).double().train()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 50, 32, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    y, info = fast(x)
    y64, info64 = ref(x64)
    assert torch.equal(info.expert_ids, info64.expert_ids)
    close64(y, y64)
    y.square().sum().backward()
    y64.square().sum().backward()
    close64(x.grad, x64.grad)
    for p, p64 in zip(fast.parameters(), ref.parameters()):
        close64(p.grad, p64.grad)


@pytest.mark.parametrize("num_tokens", [1, 3, 6, 40])
@pytest.mark.parametrize("activation", ["swiglu", "gelu", "silu", "geglu"])
def test_float32_inference_on_fast_paths_matches_float64(matvec, ffn_path, num_tokens, activation):
    """Decode-sized batches: the slot path (T * K <= 8) and small groups take matrix-vector products."""
    torch.manual_seed(num_tokens)
    config = MoEConfig(hidden_size=32, intermediate_size=48, num_experts=4, top_k=2, activation=activation)
    fast = MoE(config).eval()
    ref = MoE(MoEConfig(**{**vars(config), "backend": "reference"})).double().eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(num_tokens, 32)
    with torch.no_grad():
        y, info = fast(x)
        y64, info64 = ref(x.double())
    assert torch.equal(info.expert_ids, info64.expert_ids)
    close64(y, y64)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("onednn", "matvec", "taken"), [
    (True, True, True),  # AVX-512 CPUs that are not Intel's
    (False, True, True),  # AVX2 ones (Zen 2): torch.bmm needs no oneDNN
    (False, False, False),  # Intel's, or not x86: unmeasured
])
def test_experts_take_batched_ffn_for_small_groups_without_autograd_on_threads(forced, two_threads,
                                                                              monkeypatch, onednn,
                                                                              matvec, taken):
    monkeypatch.setattr(cpu, "enabled", lambda: onednn)
    monkeypatch.setattr(cpu, "matvec_enabled", lambda: matvec)
    torch.manual_seed(0)
    calls = []
    batched = cpu.batched_ffn
    monkeypatch.setattr(cpu, "batched_ffn", lambda *args: calls.append(args[3].max()) or batched(*args))
    layer = MoE(MoEConfig(hidden_size=16, intermediate_size=24, num_experts=4, top_k=2))
    x = torch.randn(16, 16)
    with torch.no_grad():
        y = layer(x).output
        layer(torch.randn(200, 16))  # groups over BATCHED_MAX_ROWS rows
        torch.set_num_threads(1)
        layer(x)
        torch.set_num_threads(2)
    layer(x)[0].sum().backward()
    assert len(calls) == int(taken) and all(c <= cpu.BATCHED_MAX_ROWS for c in calls)
    layer64 = copy.deepcopy(layer).double()
    close64(y, layer64(x.double()).output.detach())
