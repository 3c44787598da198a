"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus), seeded per row.

Sampling uses the exponential-race form of a categorical draw: ``argmax(p / Exp(1))`` picks
token ``i`` with probability ``p_i`` and needs no host sync. Each batch row draws its noise from
its own generator, seeded ``seed + row``, so row ``b`` of a batch samples exactly what a batch of
one with ``seed + b`` samples.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    """How to pick the next token.

    Attributes:
        temperature: 0 = greedy (argmax); > 0 divides the logits before the softmax.
        top_k: keep only the ``top_k`` most likely tokens (``None`` = all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (``None`` or 1.0 = all).
        seed: base seed of the per-row generators (``None`` = draw from torch's global RNG once).
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        # numbers.Real / Integral admit numpy scalars; stored as Python numbers
        def real(value: object) -> bool:
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        def integer(value: object) -> bool:
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        if not real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got "
                             f"{self.temperature!r}")
        if self.top_k is not None and (not integer(self.top_k) or self.top_k < 1):
            raise ValueError(f"top_k must be None or an int >= 1, got {self.top_k!r}")
        if self.top_p is not None and (not real(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not integer(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be None or an int in [0, 2**63), got {self.seed!r}")
        for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("seed", int)):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, kind(value))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Set to -inf the logits ``(B, V)`` outside the top-k and outside the top-p nucleus."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first one always stays).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generators(
    config: SamplingConfig, batch_size: int, device: torch.device
) -> list[torch.Generator] | None:
    """One generator per row (seeded ``seed + row``), or ``None`` for greedy decoding."""
    if config.greedy:
        return None
    base = config.seed if config.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return [torch.Generator(device=device).manual_seed(base + b) for b in range(batch_size)]


def sample(logits: Tensor, config: SamplingConfig, generators: list[torch.Generator] | None) -> Tensor:
    """Next tokens ``(B,)`` int64 from ``logits (B, V)``."""
    # A temperature below float32's smallest normal number would round to 0 (0/0 = nan) in the
    # division below; in that limit sampling is greedy anyway.
    if config.greedy or config.temperature < torch.finfo(torch.float32).tiny:
        return logits.argmax(dim=-1)
    logits = logits.float()
    # Shift by the row maximum before dividing: a tiny temperature then drives the others to -inf
    # (greedy in the limit) instead of overflowing to inf - inf = nan.
    logits = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / config.temperature,
                           config.top_k, config.top_p)
    probs = logits.softmax(dim=-1)
    noise = torch.stack([torch.empty_like(probs[0]).exponential_(generator=g) for g in generators])
    # Filtered tokens (p = 0) can never win, even against a (vanishingly rare) zero noise draw.
    return torch.where(probs > 0, probs / noise, -1.0).argmax(dim=-1)
