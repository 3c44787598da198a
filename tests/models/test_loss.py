"""The fused, chunked lm_head + cross-entropy against F.cross_entropy on materialised logits."""

import pytest
import torch
import torch.nn.functional as F

from moekit.models import MoEForCausalLM
from moekit.models import loss as loss_module
from moekit.models.loss import linear_cross_entropy
from tests.models.test_lm import cfg


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(loss_module, "_CHUNK_LOGITS", 64 * 7)  # 64-row chunks for V = 7


def reference(h, w, labels):
    return F.cross_entropy(h @ w.T, labels, ignore_index=-100)


@pytest.mark.parametrize("rows", [1, 64, 150])
def test_matches_cross_entropy_float64(small_chunks, rows):
    torch.manual_seed(rows)
    h = torch.randn(rows, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (rows,))
    labels[::3] = -100
    if rows == 1:
        labels[0] = 4
    loss = linear_cross_entropy(h, w, labels)
    ref = reference(h, w, labels)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    g = torch.autograd.grad(loss * 1.7, [h, w])
    g_ref = torch.autograd.grad(ref * 1.7, [h, w])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck(small_chunks):
    torch.manual_seed(0)
    h = torch.randn(70, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 7, (70,))
    labels[5] = -100
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, labels), (h, w))


def test_float32_matches_float64_reference():
    torch.manual_seed(1)
    h = torch.randn(300, 32, requires_grad=True)
    w = (torch.randn(4096, 32) * 0.2).requires_grad_()
    labels = torch.randint(0, 4096, (300,))
    loss = linear_cross_entropy(h, w, labels)
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference(h64, w64, labels)
    assert abs(loss.item() - ref.item()) < 1e-5
    loss.backward()
    ref.backward()
    assert (h.grad.double() - h64.grad).abs().max() < 1e-7
    assert (w.grad.double() - w64.grad).abs().max() < 1e-7


def test_all_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 3, requires_grad=True), torch.randn(5, 3)
    labels = torch.full((4,), -100)
    loss = linear_cross_entropy(h, w, labels)
    assert torch.isnan(loss) and torch.isnan(reference(h, w, labels))
    loss.backward()
    assert torch.all(h.grad == 0)


def test_without_grad_only_the_loss(monkeypatch):
    """Under no_grad (validation) no gradient is formed, even for parameters that require grad."""
    from moekit.models import loss

    calls, real = [], loss.mm_t

    def counted(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(loss, "mm_t", counted)
    h, w = torch.randn(9, 3, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    labels = torch.randint(0, 5, (9,))
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, labels), reference(h, w, labels))
    assert len(calls) == 1  # the logits only; with grad a second product forms grad_h


def loss_and_grads(model, forward, **kwargs):
    """``forward(**kwargs)``'s output, after backward of loss + aux loss, and the parameters' gradients."""
    model.zero_grad()
    out = forward(**kwargs)
    (out.loss + out.aux_loss).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_model_return_logits_false_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg())
    ids = torch.randint(0, 64, (2, 11))
    labels = ids.clone()
    labels[1, 3] = -100
    full, grads = loss_and_grads(model, model, input_ids=ids, labels=labels)
    fused, fused_grads = loss_and_grads(model, model, input_ids=ids, labels=labels, return_logits=False)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, full.loss)
    for n, g in fused_grads.items():
        torch.testing.assert_close(g, grads[n], rtol=1e-5, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="needs labels"):
        model(ids, return_logits=False)


@pytest.mark.slow
def test_torch_compile_trains_like_eager():
    """Under torch.compile the fast CPU paths step aside (inductor picks its own kernels); the
    compiled model gives eager's loss and gradients."""
    torch.manual_seed(0)
    model = MoEForCausalLM(cfg(num_hidden_layers=1))
    ids = torch.randint(0, 64, (2, 12))
    eager, grads = loss_and_grads(model, model, input_ids=ids, labels=ids, return_logits=False)
    out, compiled_grads = loss_and_grads(model, torch.compile(model), input_ids=ids, labels=ids,
                                         return_logits=False)
    torch.testing.assert_close(out.loss, eager.loss, rtol=1e-5, atol=1e-6)
    for n, g in compiled_grads.items():
        torch.testing.assert_close(g, grads[n], rtol=1e-4, atol=1e-6, msg=n)
