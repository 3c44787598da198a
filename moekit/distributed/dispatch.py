"""Expert-parallel dispatcher: the local dispatcher's two calls, with an all-to-all in between.

Each of the ``P`` ranks of an EP group holds ``E_l = E / P`` experts: rank ``p`` owns global experts
``[p * E_l, (p + 1) * E_l)``. One MoE layer on one rank, ``T`` local tokens::

    dispatch:  local sort by global expert (moekit.core.dispatch.Dispatcher)    x_SD, counts_E (E,)
               exchange counts (P, E_l) -> how many rows arrive from each peer, for each local expert
               all_to_all payload                                               x_RD (source-major)
               regroup to local-expert-major order                              x_MD, counts (E_l,)
    experts:   the same grouped-matmul seam, on the E_l local experts           y_MD
    combine:   undo the regroup, reverse all_to_all (the autograd backward of the first), local combine

With a capacity, drops are globally consistent: every rank gathers the EP group's ``ids_TK`` (and
``priority_TK``), applies :func:`moekit.core.dispatch.capacity_keep_mask` with the capacity of the
group's ``T_global`` tokens, and keeps its own rows; this is exactly the single-process decision on
the concatenated batch (rank order = token order).

Shape legend: ``P`` ranks in the EP group, ``R`` rows received (source-major), ``M`` the same rows
grouped by local expert, ``E_l`` local experts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import ProcessGroup

from moekit.core.dispatch import Dispatcher, DispatchMeta, capacity_keep_mask
from moekit.core.types import RouterOutput
from moekit.distributed.comm import all_gather_rows, all_to_all, exchange_counts


@dataclass
class ExpertParallelMeta(DispatchMeta):
    """The local :class:`DispatchMeta` of this rank's slots (``slots_S``, ``kept_TK``, ``counts_E``
    over the global ``E``, ...) plus what :meth:`ExpertParallelDispatcher.combine` needs to undo the exchange.

    Attributes:
        regroup_M: int64 ``(M,)`` row of ``x_RD`` placed at each row of the expert-major buffer.
        send_splits: rows sent to each peer in dispatch (``P`` ints).
        recv_splits: rows received from each peer in dispatch (``P`` ints).
        recv_counts_PE: int64 ``(P, E_l)`` rows received from each peer for each local expert.
        x_MD: the rows handed to the local experts (kept to tie an empty expert output to the graph).
    """

    regroup_M: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_PE: Tensor
    x_MD: Tensor | None = None


def source_major_to_expert_major(recv_counts_PE: Tensor) -> Tensor:
    """Permutation ``(M,)``: row ``m`` of the expert-major buffer is row ``regroup[m]`` of the
    source-major one.

    The source-major buffer holds chunks ``(p, e)`` in order ``p`` then ``e``; the expert-major one in
    order ``e`` then ``p`` (within a chunk the order is kept, so each expert's rows stay in rank order).
    """
    num_ranks, num_local = recv_counts_PE.shape
    sizes = recv_counts_PE.reshape(-1)
    starts = torch.cumsum(sizes, 0) - sizes  # start of chunk (p, e) in the source-major buffer
    chunk_order = torch.arange(num_ranks * num_local, device=sizes.device).view(num_ranks, num_local)
    chunk_order = chunk_order.T.reshape(-1)
    sizes_em, starts_em = sizes[chunk_order], starts[chunk_order]
    total = int(sizes.sum())
    chunk_of_row = torch.repeat_interleave(torch.arange(sizes_em.numel(), device=sizes.device), sizes_em,
                                           output_size=total)
    first_row = torch.cumsum(sizes_em, 0) - sizes_em
    offset = torch.arange(total, device=sizes.device) - first_row[chunk_of_row]
    return starts_em[chunk_of_row] + offset


class ExpertParallelDispatcher:
    """Drop-in for :class:`moekit.core.dispatch.Dispatcher` when experts are sharded over ``group``.

    Args:
        num_experts: global ``E`` (divisible by the group size).
        group: the EP process group (``None`` = the default group).
        capacity_fn: ``T_global -> capacity`` used instead of the per-rank capacity the layer passes,
            so that every rank of the group drops the same slots as one process holding the whole
            batch would; ``None`` keeps the capacity given to :meth:`dispatch`.
    """

    collective = True  # every rank of the group must call dispatch/combine, even with T = 0

    def __init__(
        self,
        num_experts: int,
        group: ProcessGroup | None = None,
        capacity_fn: Callable[[int], int | None] | None = None,
    ) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"num_experts={num_experts} must be divisible by the expert-parallel size {self.ep_size}"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size
        self.capacity_fn = capacity_fn
        self.local = Dispatcher(num_experts)

    @property
    def first_local_expert(self) -> int:
        return self.ep_rank * self.num_local_experts

    def global_keep_mask(self, routing: RouterOutput, capacity: int | None) -> Tensor:
        """``(T, K)`` bool: this rank's slots kept by the EP group's joint capacity decision."""
        ids_TK = routing.ids_TK
        num_tokens = ids_TK.shape[0]
        cols = [ids_TK.to(torch.float64)]
        if routing.priority_TK is not None:
            cols.append(routing.priority_TK.detach().to(torch.float64))
        # One gather carries ids (exact in float64) and priorities together.
        all_TK, sizes = all_gather_rows(torch.cat(cols, dim=1), self.group)
        top_k = ids_TK.shape[1]
        all_ids = all_TK[:, :top_k].round().to(torch.int64)
        all_priority = all_TK[:, top_k:] if routing.priority_TK is not None else None
        if self.capacity_fn is not None:
            capacity = self.capacity_fn(sum(sizes))
        kept_all = capacity_keep_mask(all_ids, all_priority, self.num_experts, capacity)
        start = sum(sizes[: self.ep_rank])
        return kept_all[start : start + num_tokens]

    def dispatch(
        self, x_TD: Tensor, routing: RouterOutput, capacity: int | None = None
    ) -> tuple[Tensor, Tensor, ExpertParallelMeta]:
        """Send each routed slot to the rank owning its expert.

        Args:
            x_TD: ``(T, D)`` this rank's tokens.
            routing: this rank's routing (global expert ids).
            capacity: per-expert capacity, ``None`` = dropless (see ``capacity_fn``).

        Returns:
            ``x_MD`` the rows this rank's experts compute, grouped by local expert; ``counts`` int64
            ``(E_l,)``; the metadata for :meth:`combine`.
        """
        if capacity is not None:
            kept_TK = self.global_keep_mask(routing, capacity)
            dropped_ids_TK = torch.where(kept_TK, routing.ids_TK, -1)
            routing = dataclasses.replace(routing, ids_TK=dropped_ids_TK, may_skip=True)
        x_SD, counts_E, local_meta = self.local.dispatch(x_TD, routing, None)
        send_PE = counts_E.view(self.ep_size, self.num_local_experts)
        recv_PE = exchange_counts(send_PE, self.group)
        send_splits = send_PE.sum(1).tolist()
        recv_splits = recv_PE.sum(1).tolist()
        x_RD = all_to_all(x_SD, recv_splits, send_splits, self.group)
        regroup_M = source_major_to_expert_major(recv_PE)
        x_MD = x_RD[regroup_M]
        meta = ExpertParallelMeta(**vars(local_meta), regroup_M=regroup_M, send_splits=send_splits,
                                  recv_splits=recv_splits, recv_counts_PE=recv_PE, x_MD=x_MD)
        return x_MD, recv_PE.sum(0), meta

    def combine(self, y_MD: Tensor, weights_TK: Tensor, meta: ExpertParallelMeta) -> Tensor:
        """Return each row to the rank that owns its token and take the weighted sum there, ``(T, D)``."""
        if y_MD.shape[0] == 0 and torch.is_grad_enabled() and meta.x_MD is not None:
            # No rows for the local experts: their (empty) output may be cut off the autograd graph,
            # yet both exchanges' backward passes are collectives every rank must join.
            y_MD = y_MD + meta.x_MD.sum() * 0
            if not y_MD.requires_grad:
                y_MD = y_MD.detach().requires_grad_()
        y_RD = torch.empty_like(y_MD).index_copy(0, meta.regroup_M, y_MD)
        y_SD = all_to_all(y_RD, meta.send_splits, meta.recv_splits, self.group)
        if meta.num_tokens == 0:  # stay on the autograd graph: the backward exchange needs every rank
            return y_SD[:0]
        return self.local.combine(y_SD, weights_TK, meta)
