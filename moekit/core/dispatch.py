"""Dispatch: sort the ``T * K`` routed slots so each expert's slots are contiguous; combine back.

Slots are numbered ``s = t * K + k`` (token-major, as ``ids_TK.reshape(-1)``). :class:`Dispatcher`
has two calls that pass one small :class:`DispatchMeta` between them::

    x_SD, counts_E, meta = dispatcher.dispatch(x_TD, routing, capacity)   # S = counts_E.sum()
    y_SD = experts(x_SD, counts_E)
    y_TD = dispatcher.combine(y_SD, routing.weights_TK, meta)

An expert-parallel dispatcher implements the same two calls with all-to-all, so ``MoE`` never
branches on world size. The capacity rule is the pure function :func:`capacity_keep_mask`, kept apart
from the permutation so other dispatchers reuse it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.core.types import RouterOutput


def capacity_keep_mask(
    ids_TK: Tensor, priority_TK: Tensor | None, num_experts: int, capacity: int | None
) -> Tensor:
    """Which routed slots fit into their expert's capacity.

    Slots compete for an expert in priority order: by ``priority_TK`` descending when given, else
    all first choices (``k = 0``) in token order, then all second choices, ... (GShard / Switch).
    Ties keep that default order.

    Args:
        ids_TK: ``(T, K)`` int64 expert of each slot, ``-1`` = unused.
        priority_TK: ``(T, K)`` float or ``None``.
        num_experts: ``E``.
        capacity: slots each expert may take; ``None`` = unlimited (only ``-1`` slots are dropped).

    Returns:
        ``(T, K)`` bool, True where the slot is used and within capacity.
    """
    valid_TK = ids_TK >= 0
    if capacity is None:
        return valid_TK
    num_tokens, top_k = ids_TK.shape
    # Default competition order: choice-major (k, t).
    ids_R = ids_TK.T.reshape(-1)
    # Slot index t*K + k of each rank in that (k-major) order.
    slots_TK = torch.arange(num_tokens * top_k, device=ids_TK.device).view(num_tokens, top_k)
    rank_to_slot_R = slots_TK.T.reshape(-1)
    if priority_TK is not None:
        order_R = torch.argsort(-priority_TK.T.reshape(-1).float(), stable=True)
        ids_R, rank_to_slot_R = ids_R[order_R], rank_to_slot_R[order_R]
    key_R = torch.where(ids_R < 0, num_experts, ids_R)
    sorted_key_R, by_expert_R = torch.sort(key_R, stable=True)
    counts_E1 = torch.zeros(num_experts + 1, dtype=torch.long, device=ids_TK.device)
    counts_E1.index_add_(0, key_R, torch.ones_like(key_R))
    starts_E1 = torch.cumsum(counts_E1, 0) - counts_E1
    position_R = torch.arange(key_R.numel(), device=ids_TK.device) - starts_E1[sorted_key_R]
    kept_sorted_R = (position_R < capacity) & (sorted_key_R < num_experts)
    kept_S = torch.zeros(num_tokens * top_k, dtype=torch.bool, device=ids_TK.device)
    kept_S[rank_to_slot_R[by_expert_R]] = kept_sorted_R
    return kept_S.view(num_tokens, top_k)


@dataclass
class DispatchMeta:
    """What :meth:`Dispatcher.combine` needs to undo :meth:`Dispatcher.dispatch`.

    Attributes:
        slots_S: int64 ``(S,)`` flat slot index ``t * K + k`` of each row of the sorted buffer.
        kept_TK: bool ``(T, K)`` slots that were computed (False = dropped or unused).
        counts_E: int64 ``(E,)`` rows per expert in the sorted buffer.
        num_tokens: ``T``.
        top_k: ``K`` slots per token.
        rows_S: int64 ``(S,)`` row of the padded buffer holding each sorted slot when the groups
            were padded (see :class:`Dispatcher`), else ``None`` (row ``s`` holds slot ``s``).
        slot_rows: int64 ``(T * K,)`` buffer row of each slot ``t * K + k`` when every slot was
            computed (combine is then one gather), else ``None``.
    """

    slots_S: Tensor
    kept_TK: Tensor
    counts_E: Tensor
    num_tokens: int
    top_k: int
    rows_S: Tensor | None
    slot_rows: Tensor | None


class Dispatcher:
    """Single-process dispatcher: a stable sort of the slots by expert; dropped slots are left out.

    Args:
        num_experts: ``E``.
        group_padding: optional ``x_TD -> (rows -> padded rows) or None``. When it returns a
            function, each expert's group is padded with zero rows to that many rows, so a backend
            that compiles a kernel per shape (oneDNN) meets few shapes; the experts then see the
            padded counts, and :meth:`combine` reads only the real rows.
    """

    def __init__(
        self, num_experts: int, group_padding: Callable[[Tensor], Callable[[int], int] | None] | None = None
    ) -> None:
        self.num_experts = num_experts
        self.group_padding = group_padding

    def dispatch(
        self, x_TD: Tensor, routing: RouterOutput, capacity: int | None = None
    ) -> tuple[Tensor, Tensor, DispatchMeta]:
        """Group tokens by expert.

        Args:
            x_TD: ``(T, D)`` hidden states.
            routing: the router's decision (``ids_TK``, optional ``priority_TK``).
            capacity: slots per expert, ``None`` = dropless.

        Returns:
            ``x_SD`` (rows sorted by expert), ``counts_E`` int64 rows per expert in ``x_SD`` (padding
            included), and the metadata for :meth:`combine` (its ``counts_E`` without padding).
        """
        ids_TK = routing.ids_TK
        num_tokens, top_k = ids_TK.shape
        ids_S = ids_TK.reshape(-1)
        if capacity is None and not routing.may_skip:
            kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
            key_S = ids_S
            slots_S = torch.argsort(key_S, stable=True)
        else:
            kept_TK = capacity_keep_mask(ids_TK, routing.priority_TK, self.num_experts, capacity)
            key_S = torch.where(kept_TK.reshape(-1), ids_S, self.num_experts)
            slots_S = torch.argsort(key_S, stable=True)[: int(kept_TK.sum())]  # host sync: size is data
        counts_E = torch.zeros(self.num_experts + 1, dtype=torch.long, device=ids_S.device)
        counts_E = counts_E.index_add_(0, key_S, torch.ones_like(key_S))[: self.num_experts]
        num_slots = slots_S.numel()
        pad = self.group_padding(x_TD) if self.group_padding is not None else None
        if pad is None:
            group_counts_E, rows_S, x_BD = counts_E, None, x_TD
            source_B = slots_S // top_k
        else:
            counts = counts_E.tolist()
            padded = [pad(c) for c in counts]
            group_counts_E = torch.tensor(padded, device=x_TD.device)
            # Row of sorted slot r (the j-th of expert e) in the padded buffer: padded start of e + j.
            shift = [p - c for p, c in zip(accumulate(padded, initial=0), accumulate(counts, initial=0))]
            shift_E = torch.tensor(shift[:-1], device=x_TD.device)
            rows_S = torch.arange(num_slots, device=x_TD.device) + shift_E[key_S[slots_S]]
            # Source token of each buffer row; padding rows read an appended zero row (index T).
            source_B = torch.full((sum(padded),), num_tokens, dtype=torch.long, device=x_TD.device)
            source_B[rows_S] = slots_S // top_k
            x_BD = F.pad(x_TD, (0, 0, 0, 1))
        # index_select, not x[idx]: its backward is an index_add_, ~30x faster on CPU than
        # the accumulating index_put_ of advanced indexing.
        x_BD = x_BD.index_select(0, source_B)
        slot_rows = None
        if num_slots == num_tokens * top_k:  # every slot computed: combine is one gather
            rows = rows_S if rows_S is not None else torch.arange(num_slots, device=x_TD.device)
            slot_rows = torch.empty_like(slots_S).index_copy_(0, slots_S, rows)
        meta = DispatchMeta(slots_S, kept_TK, counts_E, num_tokens, top_k, rows_S, slot_rows)
        return x_BD, group_counts_E, meta

    def combine(self, y_SD: Tensor, weights_TK: Tensor, meta: DispatchMeta) -> Tensor:
        """Weighted sum of each token's expert outputs, ``(T, D)``; dropped slots contribute zero.

        Deterministic (no atomics): rows go back to slot order, then one batched ``(1, K) @ (K, D)``.
        """
        if meta.slot_rows is not None:
            y_full_SD = y_SD.index_select(0, meta.slot_rows)
        else:
            if meta.rows_S is not None:
                y_SD = y_SD.index_select(0, meta.rows_S)
            num_slots = meta.num_tokens * meta.top_k
            y_full_SD = y_SD.new_zeros(num_slots, y_SD.shape[-1]).index_copy(0, meta.slots_S, y_SD)
        w_T1K = weights_TK.to(y_SD.dtype).unsqueeze(1)
        return torch.bmm(w_T1K, y_full_SD.view(meta.num_tokens, meta.top_k, -1)).squeeze(1)
