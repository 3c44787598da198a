"""Backends behind the one grouped-matmul seam of the routed experts.

The seam is :func:`grouped_mm`: rows of ``x_SI`` are grouped contiguously by expert (the first
``counts_E[0]`` rows belong to expert 0, the next ``counts_E[1]`` to expert 1, ...) and each row is
multiplied by its expert's weight, stored as ``(E, out, in)`` like ``nn.Linear``::

    y_SO[s] = x_SI[s] @ w_EOI[expert(s)].T

Backends:
    ``reference``  a plain Python loop over every expert; float64 friendly; the test oracle, kept forever.
    ``grouped``    float32 on CPU: oneDNN per group (:mod:`moekit.kernels.cpu`) where it is enabled
                   (there, from ``cpu.FFN_MIN_ROWS`` rows, ``Experts`` runs each expert's whole
                   feed-forward in turn, :func:`moekit.kernels.cpu.expert_ffn`, instead of two calls;
                   small inference groups run as two batched products, ``cpu.batched_ffn``, on
                   every CPU of ``cpu.matvec_enabled``);
                   else ``torch.nn.functional.grouped_mm`` where this torch/device/dtype supports it, a
                   gathered batched matmul for a handful of rows, else a loop over the non-empty groups.

A new backend (e.g. a Triton kernel) is a function with the same signature registered with
:func:`register_backend`; ``MoEConfig.backend`` picks it by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.kernels import cpu
from moekit.kernels.cpu import linear
from moekit.kernels.grouped import grouped_mm_grouped
from moekit.kernels.reference import grouped_mm_reference

GroupedMM = Callable[[Tensor, Tensor, Tensor], Tensor]

_BACKENDS: dict[str, GroupedMM] = {
    "reference": grouped_mm_reference,
    "grouped": grouped_mm_grouped,
}


def register_backend(name: str, fn: GroupedMM) -> None:
    """Register ``fn(x_SI, w_EOI, counts_E) -> y_SO`` as backend ``name`` (replaces an existing one)."""
    if not callable(fn):
        raise TypeError(f"register_backend: fn must be callable, got {type(fn).__name__}")
    _BACKENDS[name] = fn


def available_backends() -> tuple[str, ...]:
    """Names of the registered grouped-matmul backends."""
    return tuple(_BACKENDS)


def group_padding(backend: str, x_SI: Tensor) -> Callable[[int], int] | None:
    """How the dispatcher should pad each expert's group of rows for ``backend`` on ``x_SI``'s
    device and dtype: ``rows -> padded rows`` (the extra rows are zero), or ``None`` for no padding."""
    if backend == "grouped" and cpu.applies(x_SI, x_SI):
        return cpu.bucket_rows
    return None


def grouped_mm(x_SI: Tensor, w_EOI: Tensor, counts_E: Tensor, backend: str = "grouped") -> Tensor:
    """Grouped matmul over expert-sorted rows.

    Args:
        x_SI: ``(S, I)`` rows sorted by expert, ``S == counts_E.sum()``.
        w_EOI: ``(E, O, I)`` stacked expert weights (``nn.Linear`` layout).
        counts_E: ``(E,)`` int64 rows per expert.
        backend: a name from :func:`available_backends`.

    Returns:
        ``(S, O)`` in the dtype of ``x_SI`` (under ``torch.autocast``: both operands in its dtype first,
        float64 excepted, as for ``nn.Linear``).
    """
    try:
        fn = _BACKENDS[backend]
    except KeyError:
        raise ValueError(f"backend must be one of {available_backends()}, got {backend!r}") from None
    device_type = x_SI.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast casts a matmul's operands (the backends'
        dtype = torch.get_autocast_dtype(device_type)  # out= and grouped_mm calls are outside its reach)
        x_SI, w_EOI = (t if t.dtype == torch.float64 else t.to(dtype) for t in (x_SI, w_EOI))
    return fn(x_SI, w_EOI, counts_E)


__all__ = ["GroupedMM", "available_backends", "group_padding", "grouped_mm", "grouped_mm_grouped",
           "grouped_mm_reference", "linear", "register_backend"]
