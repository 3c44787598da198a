"""Routed experts as stacked 3-D weights, and the dense shared expert.

Layouts match transformers (>= 5) ``MixtralExperts`` so state_dicts load 1:1:
    gated (swiglu, geglu):  ``gate_up_proj (E, 2F, D)``  rows ``[:F]`` = gate, ``[F:]`` = up
                            ``down_proj (E, D, F)``      ``y = down(act(gate(x)) * up(x))``
    plain (gelu, relu, ..): ``up_proj (E, F, D)``, ``down_proj (E, D, F)``  ``y = down(act(up(x)))``
All expert matmuls go through the one seam :func:`moekit.kernels.grouped_mm`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.config import MoEConfig
from moekit.kernels import cpu, grouped_mm, linear

ACT_FNS: dict[str, Callable[[Tensor], Tensor]] = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class _GatedActivation(torch.autograd.Function):
    """``act(h[:, :F]) * h[:, F:]`` on the fused ``gate_up`` output ``h_SH (S, 2F)``, act = silu or gelu.

    Its backward writes the one ``(S, 2F)`` gradient directly; autograd's backward of the two column
    slices would zero-fill two ``(S, 2F)`` buffers and add them (the largest non-matmul cost in a
    profile of a CPU training step). Saves only ``h_SH``; the activation is recomputed in backward.
    """

    @staticmethod
    def forward(ctx, h_SH: Tensor, silu: bool) -> Tensor:
        inter = h_SH.shape[1] // 2
        gate_SF, up_SF = h_SH[:, :inter], h_SH[:, inter:]
        ctx.save_for_backward(h_SH)
        ctx.silu = silu
        return (F.silu(gate_SF) if silu else F.gelu(gate_SF)).mul_(up_SF)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_SF: Tensor):
        (h_SH,) = ctx.saved_tensors
        inter = h_SH.shape[1] // 2
        gate_SF, up_SF = h_SH[:, :inter], h_SH[:, inter:]
        grad_SH = torch.empty_like(h_SH)
        # Both halves written in place (the out= variants): no temporaries to copy in.
        if ctx.silu:
            torch.mul(g_SF, F.silu(gate_SF), out=grad_SH[:, inter:])
            torch.ops.aten.silu_backward(g_SF * up_SF, gate_SF, grad_input=grad_SH[:, :inter])
        else:
            torch.mul(g_SF, F.gelu(gate_SF), out=grad_SH[:, inter:])
            torch.ops.aten.gelu_backward(g_SF * up_SF, gate_SF, grad_input=grad_SH[:, :inter])
        return grad_SH, None


class Experts(nn.Module):
    """``E`` feed-forward experts applied to an expert-sorted buffer ``x_SD`` with ``counts_E``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        num_experts, hidden, inter = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = num_experts
        self.intermediate_size = inter
        self.gated = config.gated
        self.activation = config.activation
        self.act_fn = ACT_FNS[config.activation]
        self.backend = config.backend
        if self.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default bound ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for every expert."""
        for weight in (self.in_proj, self.down_proj):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)

    @property
    def in_proj(self) -> nn.Parameter:
        """The first projection: ``gate_up_proj`` (gated) or ``up_proj`` (plain)."""
        return self.gate_up_proj if self.gated else self.up_proj

    def forward(self, x_SD: Tensor, counts_E: Tensor) -> Tensor:
        """``(S, D)`` sorted rows, ``(E,)`` counts -> ``(S, D)`` expert outputs (same order).

        Two grouped matmuls through the seam with the activation between them; with the ``grouped``
        backend, where :func:`moekit.kernels.cpu.batched_applies`, the whole feed-forward instead
        runs as two batched products over all experts while no gradient is recorded, torch runs
        more than one thread, no group has more than ``BATCHED_MAX_ROWS`` rows and padding at most
        doubles them (:func:`moekit.kernels.cpu.batched_ffn`), and where
        :func:`moekit.kernels.cpu.applies`, each expert's in turn from ``FFN_MIN_ROWS`` rows
        (:func:`moekit.kernels.cpu.expert_ffn`, less memory traffic).
        """
        if self.backend == "grouped" and x_SD.shape[0]:
            if (cpu.batched_applies(x_SD, self.in_proj) and torch.get_num_threads() > 1
                    and not cpu.records_grad(x_SD, self.in_proj, self.down_proj)):
                largest = int(counts_E.max())  # a host read: only where batched_ffn is possible
                # Batched while its zero padding at most doubles the rows (it computes every expert).
                if largest <= cpu.BATCHED_MAX_ROWS and len(counts_E) * largest <= 2 * len(x_SD):
                    return cpu.batched_ffn(x_SD, self.in_proj, self.down_proj, counts_E, self._activate)
            if x_SD.shape[0] >= cpu.FFN_MIN_ROWS and cpu.applies(x_SD, self.in_proj):
                return cpu.expert_ffn(x_SD, self.in_proj, self.down_proj, counts_E, self._activate)
        h_SH = grouped_mm(x_SD, self.in_proj, counts_E, self.backend)
        return grouped_mm(self._activate(h_SH), self.down_proj, counts_E, self.backend)

    def _activate(self, h_SH: Tensor) -> Tensor:
        """``act(gate) * up`` (gated) or ``act(h)`` of the first projection's output ``(S, H)``;
        in place when autograd does not record it (inference: one temporary fewer)."""
        if not self.gated:
            return self.act_fn(h_SH)
        if cpu.records_grad(h_SH):
            return _GatedActivation.apply(h_SH, self.activation == "swiglu")
        return self.act_fn(h_SH[:, : self.intermediate_size]).mul_(h_SH[:, self.intermediate_size :])

    def forward_slots(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor) -> Tensor:
        """Small-batch path: ``y_TD[t] = sum_k weights_TK[t, k] * expert_{ids_TK[t, k]}(x_TD[t])``.

        A host-side loop over the ``T * K`` slots on weight views: no sort, no gather of weights, as
        few torch calls as possible (at one token the per-call overhead is most of the time), and
        float32 matrix-vector products on the fast CPU path (:mod:`moekit.kernels.cpu`). Meant for
        CPU decode steps (``T`` = batch size), where reading ``ids_TK`` costs nothing. Every id must
        be a valid expert (no ``-1``). Differentiable, though the layer uses it only without autograd
        (with it, each ``w[expert]`` view would build a full-size weight gradient).
        """
        inter, gated, act = self.intermediate_size, self.gated, self.act_fn
        in_proj, down_proj = self.in_proj, self.down_proj
        if not torch.is_grad_enabled():
            if cpu.matvec_applies(x_TD, in_proj):
                return self._slots_matvec(x_TD, ids_TK.tolist(), weights_TK.tolist())
            if not torch.is_autocast_enabled(x_TD.device.type):  # (its in-place sums keep one dtype)
                return self._slots_inference(x_TD, ids_TK.tolist(), weights_TK.tolist())
        weights = weights_TK.to(x_TD.dtype).unsqueeze(-1).unbind(0)  # T tensors (K, 1)
        rows = []
        for x_1D, experts, w_K in zip(x_TD.split(1), ids_TK.tolist(), weights):
            y_1D = None
            for k, expert in enumerate(experts):
                h_1H = linear(x_1D, in_proj[expert])
                if gated:
                    gate_1F, up_1F = h_1H.split(inter, dim=1)
                    h_1F = act(gate_1F) * up_1F
                else:
                    h_1F = act(h_1H)
                out_1D = linear(h_1F * w_K[k], down_proj[expert])
                y_1D = out_1D if y_1D is None else y_1D + out_1D
            rows.append(y_1D)
        return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)

    def _slots_inference(self, x_TD: Tensor, ids: list[list[int]], weights: list[list[float]]) -> Tensor:
        """:meth:`forward_slots` without autograd on torch's own products (where the matrix-vector
        path is off, e.g. on Intel's CPUs, whose MKL is fast there): per slot three torch calls and
        the activation, the combine weight folded into the down projection
        (``out.addmm_(a, down.T, alpha=weight)``) and each row's output accumulated in place: a
        1-token layer forward ran 8-16% (~25-40 us) faster than with separate ``linear`` / ``mul`` /
        ``add`` calls on an Intel Xeon (docs/benchmarks.md)."""
        in_proj, down_proj = self.in_proj, self.down_proj
        out_TD = torch.zeros_like(x_TD)
        one_row = len(ids) == 1  # no row views to make
        for t, (experts, slot_weights) in enumerate(zip(ids, weights)):
            x_1D = x_TD if one_row else x_TD[t : t + 1]
            out_1D = out_TD if one_row else out_TD[t : t + 1]
            for expert, weight in zip(experts, slot_weights):
                h_1H = F.linear(x_1D, in_proj[expert])
                out_1D.addmm_(self._activate(h_1H), down_proj[expert].T, alpha=weight)
        return out_TD

    def _slots_matvec(self, x_TD: Tensor, ids: list[list[int]], weights: list[list[float]]) -> Tensor:
        """:meth:`forward_slots` on numpy views of the weights (no copies): one OpenBLAS matrix-vector
        product per projection (see :mod:`moekit.kernels.cpu`). SiLU (``swiglu``, ``silu``) in numpy
        too, as ``g * (1 + tanh(g / 2)) / 2`` (no overflow): on one row a few numpy ufuncs cost less
        than torch's per-op overhead (a 1-token layer forward ~35 us faster on the Zen 4 CPU); other
        activations in torch."""
        inter, gated, act = self.intermediate_size, self.gated, self.act_fn
        numpy_silu = self.activation in ("swiglu", "silu")
        w_in, w_down = self.in_proj.numpy(force=True), self.down_proj.numpy(force=True)
        x = x_TD.numpy(force=True)
        out = np.zeros_like(x)
        for t, (experts, slot_weights) in enumerate(zip(ids, weights)):
            for expert, weight in zip(experts, slot_weights):
                h_H = w_in[expert] @ x[t]
                if numpy_silu:
                    gate_F = h_H[:inter] if gated else h_H
                    a_F = np.tanh(gate_F * 0.5)
                    a_F += 1.0
                    a_F *= 0.5 * weight
                    a_F *= gate_F
                    if gated:
                        a_F *= h_H[inter:]
                else:
                    h = torch.from_numpy(h_H)
                    a_F = (act(h[:inter]).mul_(h[inter:]) if gated else act(h)).mul_(weight).numpy()
                out[t] += w_down[expert] @ a_F
        return torch.from_numpy(out)

    def extra_repr(self) -> str:
        d = self.down_proj.shape
        return f"num_experts={d[0]}, hidden={d[1]}, intermediate={d[2]}, activation={self.activation}"


class SharedExpert(nn.Module):
    """Dense SwiGLU FFN for every token, named like transformers' ``Qwen2MoeMLP``
    (``gate_proj``, ``up_proj``, ``down_proj``; no biases)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_TD: Tensor) -> Tensor:
        h_TF = F.silu(linear(x_TD, self.gate_proj.weight)) * linear(x_TD, self.up_proj.weight)
        return linear(h_TF, self.down_proj.weight)
