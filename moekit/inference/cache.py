"""StaticKVCache: preallocated keys/values indexed by slot, with per-row left padding.

Shape legend: B batch, L layers, KV key/value heads, P cache slots, hd head_dim, S new positions.

A batch of prompts of different lengths is left-padded so every row writes the same slot at
each decode step. Row ``b`` has ``pad[b]`` padding slots in front; its token in slot ``j`` has the
rotary position ``j - pad[b]``, and padding slots are never attended to (a padding query sees
only itself, which keeps its values finite). Row ``b`` therefore computes exactly what a batch of
one would, positions included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from moekit.models.config import ModelConfig
from moekit.models.layers import additive_mask, sliding_window_mask

# Above this many mask elements (B * P * P) the mask is built per call instead of once.
_MAX_PRECOMPUTED_MASK = 1 << 22


class StaticKVCache:
    """Keys and values of every layer, ``(B, KV, P, hd)`` each, allocated once.

    Args:
        config: the model's config (layers, KV heads, head_dim, sliding window).
        batch_size: rows ``B``.
        max_length: slots ``P`` (prompt + new tokens, padding included); at most
            ``config.max_position_embeddings`` plus the largest padding.
        pad_lengths: left-padding slots of each row (``None`` = no padding).
        device, dtype: of the cached tensors (use the model's).
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        *,
        pad_lengths: Sequence[int] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.batch_size, self.max_length, self.window = batch_size, max_length, config.sliding_window
        self.context = config.max_position_embeddings
        self.device, self.dtype = torch.device(device), dtype
        self.set_padding(pad_lengths)

    def set_padding(self, pad_lengths: Sequence[int] | None) -> None:
        """Set each row's left padding (call before the prefill); builds positions and the mask."""
        slots = torch.arange(self.max_length, device=self.device)
        if pad_lengths is None or not any(pad_lengths):
            pad = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        else:
            if len(pad_lengths) != self.batch_size:
                raise ValueError(f"pad_lengths needs {self.batch_size} entries, got {len(pad_lengths)}")
            if min(pad_lengths) < 0 or max(pad_lengths) >= self.max_length:
                raise ValueError(
                    f"pad_lengths must lie in [0, max_length={self.max_length}), got {list(pad_lengths)}"
                )
            pad = torch.tensor(list(pad_lengths), dtype=torch.long, device=self.device)[:, None]
        self.pad = pad  # (B or 1, 1)
        self.positions = (slots[None, :] - pad).clamp_min(0)  # (B or 1, P) rotary position of each slot
        positions = self.max_length - int(pad.min())  # of the least padded row
        if positions > self.context:
            raise ValueError(
                f"max_length={self.max_length} slots with {int(pad.min())} padding slots hold positions up "
                f"to {positions - 1}, beyond the context (max_position_embeddings={self.context})"
            )
        self._mask = None
        if pad.shape[0] * self.max_length**2 <= _MAX_PRECOMPUTED_MASK:
            self._mask = self._build_mask(slots)  # (B or 1, 1, P, P)

    def _build_mask(self, q_slots: Tensor) -> Tensor:
        """Additive ``(B or 1, 1, S, P)``: causal, windowed, padding slots hidden (a query sees itself)."""
        k_slots = torch.arange(self.max_length, device=self.device)
        mask = sliding_window_mask(q_slots, k_slots, self.window)[None, None]  # (1, 1, S, P)
        if self.pad.shape[0] > 1 or bool(self.pad.any()):
            valid = (k_slots[None, :] >= self.pad)[:, None, None, :]  # (B, 1, 1, P)
            mask = mask & (valid | (q_slots[:, None] == k_slots[None, :]))
        return additive_mask(mask, self.dtype)

    def positions_and_mask(self, input_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Rotary positions ``(B or 1, S)`` and mask ``(B or 1, 1, S, P)`` of slots ``input_pos (S,)``."""
        pos = self.positions[:, input_pos]
        mask = self._mask[:, :, input_pos] if self._mask is not None else self._build_mask(input_pos)
        return pos, mask

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """``(k, v)`` of layer ``i``, each ``(B, KV, P, hd)``; the attention writes into them in place."""
        return self.k[i], self.v[i]
