"""MoEForCausalLM: a decoder-only Mixtral-style language model built on :class:`moekit.MoE`.

    input_ids (B, S) -> embed_tokens -> L x [x + attn(norm(x)); x + ffn(norm(x))] -> norm -> lm_head

``ffn`` is a :class:`moekit.MoE` in MoE layers (``config.is_moe_layer(i)``) and a dense SwiGLU
otherwise. The state_dict uses transformers' (v5) Mixtral names, so a Mixtral checkpoint loads
with ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.core.types import RoutingInfo
from moekit.kernels import linear
from moekit.models.config import ModelConfig
from moekit.models.layers import (
    Attention,
    DenseMLP,
    RMSNorm,
    RotaryEmbedding,
    additive_mask,
    sliding_window_mask,
)
from moekit.models.loss import linear_cross_entropy

if TYPE_CHECKING:
    from moekit.inference.cache import StaticKVCache


class CausalLMOutput(NamedTuple):
    """What :meth:`MoEForCausalLM.forward` returns.

    Attributes:
        logits: ``(B, S, V)`` float32, or ``None`` when called with ``return_logits=False``.
        loss: 0-dim mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` (-100
            ignored), or ``None`` without labels.
        aux_loss: 0-dim float32, sum over MoE layers of ``RoutingInfo.aux_loss`` (0 for a dense
            model). The training objective is ``loss + aux_loss``.
        routing: one :class:`moekit.RoutingInfo` per MoE layer (in layer order) when
            ``output_routing=True``, else ``None``.
    """

    logits: Tensor | None
    loss: Tensor | None
    aux_loss: Tensor
    routing: list[RoutingInfo] | None


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = config.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if self.is_moe:
            from moekit.core.moe import MoE  # the one sparse layer of the library

            self.mlp: nn.Module = MoE(config.moe_config())
        else:
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        kv: tuple[Tensor, Tensor] | None,
        input_pos: Tensor | None,
    ) -> tuple[Tensor, RoutingInfo | None]:
        # Norms are called through .forward: module-call overhead matters in small decode steps.
        x = x + self.self_attn(self.input_layernorm.forward(x), cos, sin, mask, kv, input_pos)
        h = self.post_attention_layernorm.forward(x)
        if self.is_moe:
            y, info = self.mlp(h)
            return x + y, info
        return x + self.mlp(h), None


class MoEModel(nn.Module):
    """The decoder stack without the head: ``input_ids (B, S) -> hidden (B, S, D)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)

    def forward(
        self,
        input_ids: Tensor,
        *,
        kv_cache: StaticKVCache | None = None,
        input_pos: Tensor | None = None,
    ) -> tuple[Tensor, list[RoutingInfo]]:
        """Hidden states ``(B, S, D)`` after the final norm, and the MoE layers' routing info.

        Without a cache, ``input_pos (S,)`` (default ``arange(S)``) gives the positions and the
        attention is causal (and windowed) over these S tokens. With a cache, ``input_pos`` names
        the cache slots to fill; the cache supplies each row's positions and attention mask.
        """
        B, S = input_ids.shape
        x = self.embed_tokens(input_ids)
        cos_t, sin_t = self.rope.tables(x.device, x.dtype)
        if kv_cache is not None:
            if input_pos is None:
                raise ValueError("input_pos (the cache slots to fill) is required with kv_cache")
            pos, mask = kv_cache.positions_and_mask(input_pos)
        else:
            pos = torch.arange(S, device=x.device) if input_pos is None else input_pos
            limit = self.config.max_position_embeddings
            if limit < S:
                raise ValueError(f"sequence length {S} exceeds max_position_embeddings={limit}")
            if input_pos is not None and (input_pos.shape != (S,) or (
                    S and not 0 <= int(input_pos.min()) <= int(input_pos.max()) < limit)):
                span = f" from {int(input_pos.min())} to {int(input_pos.max())}" if input_pos.numel() else ""
                raise ValueError(f"input_pos must be ({S},) positions in [0, max_position_embeddings="
                                 f"{limit}), got shape {tuple(input_pos.shape)}{span}")
            window = self.config.sliding_window
            if window is None or window >= S:
                mask = None
            else:
                mask = additive_mask(sliding_window_mask(pos, pos, window), x.dtype)
        cos, sin = cos_t[pos].unsqueeze(-2), sin_t[pos].unsqueeze(-2)  # (B or 1, S, 1, hd)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        routing: list[RoutingInfo] = []
        for i, layer in enumerate(self.layers):
            kv = kv_cache.layer(i) if kv_cache is not None else None
            x, info = layer(x, cos, sin, mask, kv, input_pos)
            if info is not None:
                routing.append(info)
        return self.norm(x), routing


class MoEForCausalLM(nn.Module):
    """Decoder-only MoE language model (Mixtral family) with an LM head.

    Example::

        model = MoEForCausalLM(get_preset("tiny"))
        out = model(input_ids, labels=input_ids)
        (out.loss + out.aux_loss).backward()
    """

    def __init__(self, config: ModelConfig) -> None:
        if not isinstance(config, ModelConfig):
            raise TypeError(f"MoEForCausalLM expects a ModelConfig, got {type(config).__name__}")
        super().__init__()
        self.config = config
        # A loaded checkpoint's generation defaults (generation_config.json; set by from_pretrained):
        # generate() stops on all their eos ids, save_pretrained writes them back.
        self.generation_config: dict[str, Any] | None = None
        self.model = MoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) for every matrix (experts, router too), zero biases, unit norms;
        ``noisy_topk``'s noise projection starts at zero (as in Shazeer et al.'s code and ``moekit.MoE``)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if p.device.type == "meta":
                continue
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif leaf in ("bias", "noise_weight") or p.dim() < 2:
                p.zero_()
            else:
                p.normal_(0.0, std)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        *,
        kv_cache: StaticKVCache | None = None,
        input_pos: Tensor | None = None,
        output_routing: bool = False,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        """``input_ids (B, S) int64 -> CausalLMOutput`` (see there); ``labels (B, S)``, -100 = ignore.

        ``return_logits=False`` with ``labels`` (training, validation) computes the loss with the
        fused head + cross-entropy of :func:`moekit.models.loss.linear_cross_entropy`, which never
        holds the ``(B, S, V)`` logits; ``logits`` is then ``None``.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 (or int32) tensor of shape (batch, seq)")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(
                f"labels shape {tuple(labels.shape)} must equal input_ids shape {tuple(input_ids.shape)}"
            )
        if labels is not None:
            if labels.dtype not in (torch.int64, torch.int32):
                raise TypeError(f"labels must be an int64 (or int32) tensor, got dtype {labels.dtype}")
            labels = labels.long()
        if not return_logits and labels is None:
            raise ValueError("return_logits=False needs labels (it only skips the logits of the loss)")
        hidden, routing = self.model(input_ids, kv_cache=kv_cache, input_pos=input_pos)
        logits = loss = None
        if return_logits:
            logits = linear(hidden, self.lm_head.weight).float()
            if labels is not None:
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
                )
        else:
            hidden_ND = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            loss = linear_cross_entropy(hidden_ND, self.lm_head.weight, labels[:, 1:].reshape(-1))
        if routing:
            aux_loss = torch.stack([r.aux_loss.float() for r in routing]).sum()
        else:
            aux_loss = torch.zeros((), device=hidden.device)
        return CausalLMOutput(logits, loss, aux_loss, routing if output_routing else None)

    def moe_layers(self) -> list[nn.Module]:
        """The :class:`moekit.MoE` modules, in layer order."""
        return [layer.mlp for layer in self.model.layers if layer.is_moe]

    def update_router_bias(self) -> int:
        """Apply the aux-loss-free bias update (:meth:`moekit.MoE.update_bias`) of every
        ``sigmoid_bias`` MoE layer; call once after each ``optimizer.step()``. Returns how many
        layers it updated (0 for the other routers)."""
        layers = [m for m in self.moe_layers() if m.config.router == "sigmoid_bias"]
        for moe in layers:
            moe.update_bias()
        return len(layers)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> MoEForCausalLM:
        """Load an HF / Mistral checkpoint directory; see :func:`moekit.hf.from_pretrained`."""
        from moekit.hf.load import from_pretrained

        return from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> Any:
        """Write an HF checkpoint directory (config.json + safetensors shards); see
        :func:`moekit.hf.save_pretrained` for ``max_shard_size``, ``model_type``, ``dtype``, ``tokenizer``."""
        from moekit.hf.save import save_pretrained

        return save_pretrained(self, save_directory, **kwargs)

    def num_parameters(self, active: bool = False) -> int:
        """Parameters counted once (tied head included once).

        ``active=True`` counts what one token touches: everything except, in each MoE layer, the
        weights of the ``num_experts - top_k`` experts it does not choose (``expert_choice``: of all
        but ``config.experts_per_token`` experts, on average).
        """
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        if not active:
            return total
        cfg = self.config
        for moe in self.moe_layers():
            expert_params = sum(p.numel() for p in moe.experts.parameters())
            total -= cfg.inactive_expert_parameters(expert_params)
        return total
