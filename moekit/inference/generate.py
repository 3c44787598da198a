"""Autoregressive generation with a static KV cache: ``prefill`` once, then ``decode_one_token``.

``prefill`` and ``decode_one_token`` are separate functions (gpt-fast style) so the decode step,
which always has the same shapes, can be compiled. A batch of prompts is left-padded (see
:class:`StaticKVCache`); every row yields what it would yield alone.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from moekit.inference.cache import StaticKVCache
from moekit.inference.sampling import SamplingConfig, make_generators, sample
from moekit.kernels import cpu, linear
from moekit.models.config import ModelConfig
from moekit.models.model import MoEForCausalLM

TokenCallback = Callable[[int, int], "bool | None"]


@torch.no_grad()
def prefill(model: MoEForCausalLM, input_ids: Tensor, kv_cache: StaticKVCache, input_pos: Tensor) -> Tensor:
    """Run the prompt ``input_ids (B, S)`` into slots ``input_pos (S,)``; last logits ``(B, V)``."""
    hidden, _ = model.model(input_ids, kv_cache=kv_cache, input_pos=input_pos)
    return linear(hidden[:, -1], model.lm_head.weight).float()


@torch.no_grad()
def decode_one_token(
    model: MoEForCausalLM, token: Tensor, kv_cache: StaticKVCache, input_pos: Tensor
) -> Tensor:
    """One step: ``token (B, 1)`` at slot ``input_pos (1,)`` -> next-token logits ``(B, V)``."""
    hidden, _ = model.model(token, kv_cache=kv_cache, input_pos=input_pos)
    return linear(hidden[:, -1], model.lm_head.weight).float()


_COMPILED: dict[str, Callable] = {}


def compiled_decode_one_token() -> Callable:
    """``torch.compile``-d :func:`decode_one_token` (built once per process; first call compiles)."""
    if "decode" not in _COMPILED:
        _COMPILED["decode"] = torch.compile(decode_one_token, dynamic=False, fullgraph=False)
    return _COMPILED["decode"]


def default_stop_ids(model: MoEForCausalLM) -> tuple[int, ...]:
    """The stop tokens of :func:`generate` when none are given: ``config.eos_token_id`` and the eos
    ids of ``model.generation_config`` (a loaded checkpoint's, e.g. Qwen3's two), those in the vocabulary."""
    cfg = model.config
    eos = (model.generation_config or {}).get("eos_token_id")
    ids = [cfg.eos_token_id, *(eos if isinstance(eos, list) else [eos])]
    return tuple(dict.fromkeys(
        i for i in ids if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg.vocab_size
    ))


def _check_prompts(model: MoEForCausalLM, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    if not isinstance(model, MoEForCausalLM):
        raise TypeError(f"model must be a moekit MoEForCausalLM, got {type(model).__name__}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
        raise ValueError("prompt_ids must be a non-empty list of token-id lists (one per prompt)")
    cfg = model.config
    for b, ids in enumerate(prompt_ids):
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(ids) == 0:
            raise ValueError(f"prompt_ids[{b}] must be a non-empty list of token ids")
        if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < cfg.vocab_size
               for t in ids):  # Integral: NumPy integers too
            raise ValueError(f"prompt_ids[{b}] holds a token id outside [0, vocab_size={cfg.vocab_size})")
        # The last new token is never fed back: the model sees len + max_new_tokens - 1 positions.
        if len(ids) + max_new_tokens - 1 > cfg.max_position_embeddings:
            raise ValueError(
                f"prompt {b} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                f"context (max_position_embeddings={cfg.max_position_embeddings}: prompt + new tokens - 1 "
                "must fit)"
            )


def _warn_if_routing_couples_tokens(cfg: ModelConfig) -> None:
    """Capacity limits and expert choice make a token's experts depend on the other tokens of the
    forward pass (the batch's rows, padding included, and how the sequence is split into prefill and
    decode steps), so generate's batch and KV-cache guarantees do not hold for them."""
    if cfg.num_experts == 0:
        return
    how = "expert_choice routing" if cfg.router == "expert_choice" else (
        f"capacity_factor={cfg.capacity_factor}" if cfg.capacity_factor is not None else None)
    if how is not None:
        warnings.warn(
            f"generate: the MoE layers use {how}, so a token's experts depend on the other tokens of "
            "each forward pass; a row's continuation depends on the rest of the batch and differs from "
            "a full recomputation (dropless token-choice routing has neither effect)",
            UserWarning, stacklevel=3,
        )


@torch.no_grad()
def generate(
    model: MoEForCausalLM,
    prompt_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_token_ids: Sequence[int] | None = None,
    on_token: TokenCallback | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    Args:
        prompt_ids: one list of token ids per prompt (lengths may differ).
        temperature, top_k, top_p, seed: see :class:`SamplingConfig`; ``temperature=0`` is greedy.
            Row ``b`` samples with seed ``seed + b``.
        stop_token_ids: a row stops when it produces one of these (not included in its output).
            ``None``: ``config.eos_token_id`` and a loaded checkpoint's generation eos ids.
        on_token: ``on_token(row, token_id)`` for every new kept token as it is produced
            (streaming); returning True stops that row (used for stop strings).
        compile: run the decode step through ``torch.compile`` (first call compiles).

    Returns:
        The new tokens of each row (prompts not included), stop token excluded.
    """
    _check_prompts(model, prompt_ids, max_new_tokens)
    _warn_if_routing_couples_tokens(model.config)
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    cfg = model.config
    stops = set(default_stop_ids(model) if stop_token_ids is None else stop_token_ids)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    B, lens = len(prompt_ids), [len(p) for p in prompt_ids]
    prompt_len = max(lens)
    pads = [prompt_len - n for n in lens]
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids = torch.tensor(
        [[pad_id] * pad + list(p) for pad, p in zip(pads, prompt_ids)], dtype=torch.long, device=device
    )
    length = prompt_len + max_new_tokens - 1  # every position the model is given
    cache = StaticKVCache(cfg, B, length, pad_lengths=pads, device=device, dtype=dtype)
    slots = torch.arange(length, device=device)
    generators = make_generators(sampling, B, device)
    decode = compiled_decode_one_token() if compile else decode_one_token

    was_training = model.training
    model.eval()
    # Decode steps are matrix-vector products; on the CPUs of moekit.kernels.cpu numpy's OpenBLAS
    # on one thread streams the weights ~2x faster than torch's MKL (restored afterwards).
    try:
        with cpu.single_threaded_blas():
            logits = prefill(model, ids, cache, slots[:prompt_len])
            out: list[list[int]] = [[] for _ in range(B)]
            done = [False] * B
            for step in range(max_new_tokens):
                token = sample(logits, sampling, generators)
                for b, t in enumerate(token.tolist()):  # the one host sync per step
                    if done[b]:
                        continue
                    if t in stops:
                        done[b] = True
                        continue
                    out[b].append(t)
                    if on_token is not None and on_token(b, t):
                        done[b] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                pos = prompt_len + step
                logits = decode(model, token.view(B, 1), cache, slots[pos : pos + 1])
    finally:
        model.train(was_training)
    return out
