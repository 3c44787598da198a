"""Autograd-aware collectives for expert parallelism.

The token exchange is two ``all_to_all_single`` calls: first the small integer counts (so every
rank learns how many rows it will receive from each peer), then the variable-size payload. The
payload exchange is differentiable: its backward is the reverse exchange (send and receive splits
swapped), so gradients flow back to the rank that owns each token.

Shape legend: ``P`` ranks in the exchange group, ``N`` rows sent, ``M`` rows received.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup


class ExchangeTimer:
    """Wall time spent in the token exchange (counts and payload, forward and backward).

    Off by default (no cost); benchmarks set ``EXCHANGE_TIMER.enabled = True``. On CUDA each timed
    call synchronises the device first and last, so the time is the collective's own.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.seconds = 0.0
        self.calls = 0

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0

    @contextlib.contextmanager
    def measure(self, t: Tensor) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        start = time.perf_counter()
        yield
        if t.is_cuda:
            torch.cuda.synchronize(t.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1


EXCHANGE_TIMER = ExchangeTimer()


def exchange_counts(send_counts: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Swap per-destination counts with every peer of ``group``.

    Args:
        send_counts: int64 ``(P, ...)``; row ``p`` is what this rank sends to rank ``p`` of the group.
    Returns:
        int64 ``(P, ...)`` on the same device; row ``p`` is what rank ``p`` sends to this rank.
    """
    world = dist.get_world_size(group)
    if send_counts.dim() < 1 or send_counts.shape[0] != world:
        raise ValueError(
            f"send_counts must have shape (group size {world}, ...), got {tuple(send_counts.shape)}"
        )
    send = send_counts.to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    with EXCHANGE_TIMER.measure(send):
        dist.all_to_all_single(recv, send, group=group)
    return recv


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None):
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        with EXCHANGE_TIMER.measure(x):
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out_splits, in_splits = ctx.splits
        # The reverse exchange: what came in from rank p goes back to rank p.
        grad_in = _AllToAll.apply(grad_out.contiguous(), in_splits, out_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(
    x: Tensor, out_splits: list[int], in_splits: list[int], group: ProcessGroup | None = None
) -> Tensor:
    """Differentiable variable-size ``all_to_all_single`` along dim 0.

    Args:
        x: ``(N, ...)``; rows ``[sum(in_splits[:p]), sum(in_splits[:p+1]))`` go to rank ``p``.
        out_splits: rows received from each rank (from :func:`exchange_counts`), length ``P``.
        in_splits: rows sent to each rank, length ``P``, summing to ``N``.
    Returns:
        ``(M, ...)`` with ``M = sum(out_splits)``, ordered by source rank.
    """
    world = dist.get_world_size(group)
    if len(out_splits) != world or len(in_splits) != world:
        raise ValueError(
            f"out_splits and in_splits need {world} entries, got {len(out_splits)}, {len(in_splits)}"
        )
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"in_splits sum to {sum(in_splits)} but x has {x.shape[0]} rows")
    return _AllToAll.apply(x, [int(s) for s in out_splits], [int(s) for s in in_splits], group)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # Every rank's objective may depend on the sum, so the input's gradient is the sum of theirs.
        grad = grad_out.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group: ProcessGroup | None = None) -> Tensor:
    """Differentiable sum over ``group`` (backward: sum of the peers' output gradients).

    Use it for statistics that enter a loss which every rank adds to its own objective, where the
    training objective is the sum (or, after gradient averaging, the mean) of the ranks' objectives.
    """
    return _AllReduceSum.apply(x, group)


def all_gather_rows(x: Tensor, group: ProcessGroup | None = None) -> tuple[Tensor, list[int]]:
    """Gather ``(N_p, ...)`` tensors with different ``N_p`` from every rank (no autograd).

    Returns:
        the concatenation ``(sum N_p, ...)`` in rank order and the list of ``N_p``.
    """
    world = dist.get_world_size(group)
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(sizes, n, group=group)
    rows = [int(s.item()) for s in sizes]
    pad = max(rows)
    padded = x.new_zeros((pad, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:r] for p, r in zip(parts, rows)]), rows
