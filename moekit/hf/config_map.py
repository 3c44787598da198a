"""Map checkpoint configs (HF ``config.json``, Mistral ``params.json``) to moekit ``ModelConfig`` and back.

The mapping works on plain dicts so it is testable without the model: ``*_to_kwargs`` return the
keyword arguments of :class:`moekit.models.ModelConfig`; ``*_from_config`` read any object with the
``ModelConfig`` attributes. The math each ``model_type`` implies (transformers 5.x):

- ``mixtral``: every layer MoE, softmax top-k renormalised (no ``norm_topk_prob`` option), no bias.
- ``qwen2_moe``: q/k/v bias (``qkv_bias``), a shared expert scaled by ``sigmoid(x @ w)``, layer ``i``
  is MoE iff ``i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0``, else a dense MLP
  of width ``intermediate_size``; experts have width ``moe_intermediate_size``.
- ``qwen3_moe``: Qwen2-MoE's layer rule, widths and router without the shared expert and the q/k/v
  bias; RMSNorm over each head of q and k (``qk_norm="head"``, one ``(head_dim,)`` weight each).
- ``olmoe``: RMSNorm over the full q_proj / k_proj outputs (``qk_norm="full"``), experts of width
  ``intermediate_size``, ``norm_topk_prob`` from the config (False for the released models).
"""

from __future__ import annotations

import warnings
from typing import Any

MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
ARCHITECTURES = {
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
# What transformers' config classes assume when a config.json leaves a key out (transformers 5.x):
# rope_theta (MixtralConfig.default_theta; the others 10000), rms_norm_eps, max_position_embeddings.
_DEFAULT_THETA = {"mixtral": 1e6, "qwen2_moe": 10000.0, "qwen3_moe": 10000.0, "olmoe": 10000.0}
_DEFAULT_EPS = {"mixtral": 1e-5, "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "olmoe": 1e-5}
_DEFAULT_CONTEXT = {"mixtral": 4096 * 32, "qwen2_moe": 32768, "qwen3_moe": 32768, "olmoe": 4096}


def _get(hf: dict[str, Any], key: str, default: Any) -> Any:
    """``hf[key]``, or ``default`` when the key is missing or null."""
    value = hf.get(key)
    return default if value is None else value


def _require(hf: dict[str, Any], key: str, source: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ValueError(f"{source}: required key {key!r} is missing")
    return hf[key]


def _num_experts(hf: dict[str, Any], model_type: str, source: str) -> int:
    """The routed-expert count: mixtral names it ``num_local_experts``, the others ``num_experts``; either
    is read, since transformers 5 writes ``num_local_experts`` for qwen3_moe (its attribute_map)."""
    keys = ("num_experts", "num_local_experts")
    if model_type == "mixtral":
        keys = keys[::-1]
    for key in keys:
        if hf.get(key) is not None:
            return int(hf[key])
    raise ValueError(f"{source}: required key {keys[0]!r} is missing")


def _rope_theta(hf: dict[str, Any], model_type: str, source: str) -> float:
    """rope_theta from a v5 ``rope_parameters`` dict or a v4 top-level ``rope_theta`` / ``rope_scaling``."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for section in (params, scaling):  # both are read: a v5 config may still carry a v4 rope_scaling
        rope_type = section.get("rope_type", section.get("type"))
        if rope_type not in (None, "default"):
            raise ValueError(
                f"{source}: rope type {rope_type!r} is not supported by moekit (only the default RoPE)"
            )
    theta = params.get("rope_theta", hf.get("rope_theta"))
    return float(_DEFAULT_THETA[model_type] if theta is None else theta)


def _token_id(value: Any, key: str, source: str, vocab_size: int) -> int | None:
    """A special token id; ids outside the vocabulary are dropped with a warning (transformers loads
    such configs too, e.g. ``pad_token_id: -1``). A list (several end-of-sequence ids) gives its
    first valid id: generation stops on all of them (``moekit.hf.chat.stop_token_ids``)."""
    ids = value if isinstance(value, list) else [value]
    if value is None or value == []:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ids):
        raise ValueError(f"{source}: {key} must be an int, a list of ints or null, got {value!r}")
    valid = [v for v in ids if 0 <= v < vocab_size]
    if len(valid) < len(ids):
        warnings.warn(f"{source}: {key}={value!r} lies outside the vocabulary ({vocab_size}); "
                      f"{'ignored' if not valid else f'using {valid[0]}'}", UserWarning, stacklevel=3)
    return valid[0] if valid else None


def hf_to_kwargs(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """``ModelConfig`` keyword arguments for an HF ``config.json`` dict.

    Raises ``ValueError`` naming ``source`` and the key for an unknown ``model_type``, a missing key or
    a feature moekit does not implement (another activation, RoPE scaling, sliding window per layer,
    OLMoE ``clip_qkv`` / ``attention_bias``).
    """
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"{source}: unknown model_type {model_type!r}; moekit loads {', '.join(MODEL_TYPES)}"
        )
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ValueError(f"{source}: quantized checkpoints (quant_method {method!r}) are not supported; "
                         "use the unquantized (bf16 / fp16 / fp32) weights")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported (the SwiGLU experts use 'silu')")
    d = int(_require(hf, "hidden_size", source))
    heads = int(_require(hf, "num_attention_heads", source))
    kv_heads = hf.get("num_key_value_heads") or heads
    head_dim = hf.get("head_dim") or d // heads
    vocab = int(_require(hf, "vocab_size", source))
    kw: dict[str, Any] = {
        "vocab_size": vocab,
        "hidden_size": d,
        "num_hidden_layers": int(_require(hf, "num_hidden_layers", source)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(head_dim),
        "max_position_embeddings": int(_get(hf, "max_position_embeddings", _DEFAULT_CONTEXT[model_type])),
        "rope_theta": _rope_theta(hf, model_type, source),
        "rms_norm_eps": float(_get(hf, "rms_norm_eps", _DEFAULT_EPS[model_type])),
        "sliding_window": None,
        "attention_bias": False,
        "qk_norm": None,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "top_k": int(_require(hf, "num_experts_per_tok", source)),
        "router": "topk",
        "router_aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.001)),
        "router_jitter_noise": float(hf.get("router_jitter_noise", 0.0)),
        "shared_expert_intermediate_size": 0,
        "shared_expert_gate": False,
        "decoder_sparse_step": 1,
        "first_k_dense_replace": 0,
        "mlp_only_layers": (),
        "initializer_range": float(hf.get("initializer_range", 0.02)),
        "bos_token_id": _token_id(hf.get("bos_token_id"), "bos_token_id", source, vocab),
        "eos_token_id": _token_id(hf.get("eos_token_id"), "eos_token_id", source, vocab),
        "pad_token_id": _token_id(hf.get("pad_token_id"), "pad_token_id", source, vocab),
    }
    if model_type == "mixtral":
        f = int(_require(hf, "intermediate_size", source))
        kw.update(
            num_experts=_num_experts(hf, model_type, source),
            intermediate_size=f,
            moe_intermediate_size=f,
            norm_topk_prob=True,
            sliding_window=hf.get("sliding_window"),
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        if hf.get("use_sliding_window"):
            raise ValueError(
                f"{source}: use_sliding_window=true (per-layer sliding attention) is not supported"
            )
        kw.update(
            num_experts=_num_experts(hf, model_type, source),
            intermediate_size=int(_require(hf, "intermediate_size", source)),
            moe_intermediate_size=int(_require(hf, "moe_intermediate_size", source)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            decoder_sparse_step=int(hf.get("decoder_sparse_step", 1)),
            mlp_only_layers=tuple(sorted(int(i) for i in hf.get("mlp_only_layers") or ())),
        )
        if model_type == "qwen2_moe":
            shared = int(hf.get("shared_expert_intermediate_size", 0))
            kw.update(
                attention_bias=bool(hf.get("qkv_bias", True)),
                shared_expert_intermediate_size=shared,
                shared_expert_gate=shared > 0,
            )
        else:
            if hf.get("attention_bias"):
                raise ValueError(
                    f"{source}: attention_bias=true is not supported for qwen3_moe (its o_proj has a bias)"
                )
            kw.update(qk_norm="head")
    else:  # olmoe
        if hf.get("clip_qkv") is not None:
            raise ValueError(f"{source}: clip_qkv={hf['clip_qkv']!r} is not supported (only null)")
        if hf.get("attention_bias"):
            raise ValueError(
                f"{source}: attention_bias=true is not supported for olmoe (its o_proj has a bias)"
            )
        if head_dim * heads != d:
            raise ValueError(f"{source}: olmoe needs head_dim * num_attention_heads == hidden_size")
        f = int(_require(hf, "intermediate_size", source))
        kw.update(
            num_experts=_num_experts(hf, model_type, source),
            intermediate_size=f,
            moe_intermediate_size=f,
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qk_norm="full",
        )
    return kw


def pick_model_type(cfg: Any) -> str:
    """The HF ``model_type`` that reproduces ``cfg``'s math: olmoe (full q/k norm), qwen3_moe (per-head
    q/k norm), qwen2_moe (bias, shared expert, dense layers or unnormalised top-k) or mixtral."""
    if cfg.qk_norm == "full":
        return "olmoe"
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    dense = any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    if cfg.attention_bias or cfg.shared_expert_intermediate_size or dense or not cfg.norm_topk_prob:
        return "qwen2_moe"
    return "mixtral"


def _check_exportable(cfg: Any, model_type: str, target: str | None = None) -> None:
    """Raise ``ValueError`` listing what ``model_type``'s math cannot express (``target`` names the
    output in the message; default ``HF 'model_type'``)."""
    problems = []
    if cfg.router != "topk":
        problems.append(f"router={cfg.router!r} (HF MoE models use 'topk')")
    if getattr(cfg, "capacity_factor", None) is not None:
        problems.append(f"capacity_factor={cfg.capacity_factor} (HF MoE models are dropless)")
    if getattr(cfg, "activation", "swiglu") != "swiglu":
        problems.append(f"activation={cfg.activation!r} (HF experts are SwiGLU)")
    if getattr(cfg, "routed_scaling_factor", 1.0) != 1.0:
        problems.append("routed_scaling_factor != 1")
    dense = [i for i in range(cfg.num_hidden_layers) if not cfg.is_moe_layer(i)]
    if model_type == "mixtral":
        if not cfg.norm_topk_prob:
            problems.append("norm_topk_prob=False (mixtral always renormalises)")
        if cfg.attention_bias or cfg.qk_norm or cfg.shared_expert_intermediate_size or dense:
            problems.append("attention bias, q/k norm, shared expert or dense layers (not in mixtral)")
        if cfg.moe_intermediate_size != cfg.intermediate_size and dense:
            problems.append("distinct dense and expert widths")
    elif model_type == "qwen2_moe":
        if cfg.qk_norm:
            problems.append(f"qk_norm={cfg.qk_norm!r} (not in qwen2_moe)")
        if cfg.shared_expert_intermediate_size and not cfg.shared_expert_gate:
            problems.append("a shared expert without its sigmoid gate (qwen2_moe always gates it)")
        if cfg.sliding_window is not None:
            problems.append("sliding_window (qwen2_moe's per-layer window is not mapped)")
    elif model_type == "qwen3_moe":
        if cfg.qk_norm != "head":
            problems.append(f"qk_norm={cfg.qk_norm!r} (qwen3_moe always normalises q and k per head)")
        if cfg.attention_bias or cfg.shared_expert_intermediate_size:
            problems.append("attention bias or shared expert (not in qwen3_moe)")
        if cfg.sliding_window is not None:
            problems.append("sliding_window (qwen3_moe's window is not mapped)")
    elif model_type == "olmoe":
        if cfg.qk_norm != "full":
            problems.append(f"qk_norm={cfg.qk_norm!r} (olmoe always normalises the full q and k)")
        if cfg.attention_bias or cfg.shared_expert_intermediate_size or dense:
            problems.append("attention bias, shared expert or dense layers (not in olmoe)")
        if cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
            problems.append("head_dim * num_attention_heads != hidden_size")
        if cfg.sliding_window is not None:
            problems.append("sliding_window (not in olmoe)")
    else:
        raise ValueError(f"model_type must be one of {MODEL_TYPES} or None (auto), got {model_type!r}")
    if problems:
        target = target or f"HF {model_type!r}"
        raise ValueError(f"this model cannot be written as {target}: " + "; ".join(problems))


def hf_from_config(cfg: Any, model_type: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """An HF ``config.json`` dict for a moekit ``ModelConfig`` (``model_type=None`` picks one)."""
    model_type = model_type or pick_model_type(cfg)
    _check_exportable(cfg, model_type)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_theta": float(cfg.rope_theta), "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "num_experts_per_tok": cfg.top_k,
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "attention_dropout": 0.0,
        "output_router_logits": False,
        "use_cache": True,
        "dtype": dtype,
    }
    if model_type == "mixtral":
        hf.update(
            num_local_experts=cfg.num_experts,
            intermediate_size=cfg.moe_intermediate_size,
            head_dim=cfg.head_dim,
            sliding_window=cfg.sliding_window,
            router_jitter_noise=cfg.router_jitter_noise,
        )
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        mlp_only = sorted(
            i for i in range(cfg.num_hidden_layers)
            if not cfg.is_moe_layer(i) and (i + 1) % cfg.decoder_sparse_step == 0
        )
        hf.update(
            num_experts=cfg.num_experts,
            intermediate_size=cfg.intermediate_size,
            moe_intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=cfg.decoder_sparse_step,
            mlp_only_layers=mlp_only,
            use_sliding_window=False,
            head_dim=cfg.head_dim,
        )
        if model_type == "qwen2_moe":
            hf.update(
                shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                qkv_bias=cfg.attention_bias,
            )
        else:
            hf.update(attention_bias=False, sliding_window=None)
    else:
        hf.update(
            num_experts=cfg.num_experts,
            intermediate_size=cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob,
            attention_bias=False,
            clip_qkv=None,
        )
    return hf


_MISTRAL_KEYS = (
    "dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "norm_eps", "vocab_size"
)


def mistral_to_kwargs(params: dict[str, Any], source: str = "params.json") -> dict[str, Any]:
    """``ModelConfig`` keyword arguments for Mistral's ``params.json`` of a Mixtral model."""
    for key in _MISTRAL_KEYS:
        _require(params, key, source)
    moe = params.get("moe")
    if not isinstance(moe, dict):
        raise ValueError(f"{source}: no 'moe' section; moekit loads Mistral's MoE models (Mixtral) only")
    for key in ("num_experts", "num_experts_per_tok"):
        _require(moe, key, f"{source} moe")
    theta = params.get("rope_theta")
    return {
        "vocab_size": int(params["vocab_size"]),
        "hidden_size": int(params["dim"]),
        "num_hidden_layers": int(params["n_layers"]),
        "num_attention_heads": int(params["n_heads"]),
        "num_key_value_heads": int(params["n_kv_heads"]),
        "head_dim": int(params["head_dim"]),
        "max_position_embeddings": int(params.get("max_seq_len", 32768)),
        # mistral-inference falls back to 1e6 when params.json names no rope_theta
        "rope_theta": float(1e6 if theta is None else theta),
        "rms_norm_eps": float(params["norm_eps"]),
        "sliding_window": params.get("sliding_window"),
        "attention_bias": False,
        "qk_norm": None,
        "tie_word_embeddings": False,
        "intermediate_size": int(params["hidden_dim"]),
        "moe_intermediate_size": int(params["hidden_dim"]),
        "num_experts": int(moe["num_experts"]),
        "top_k": int(moe["num_experts_per_tok"]),
        "router": "topk",
        "norm_topk_prob": True,
        "shared_expert_intermediate_size": 0,
        "shared_expert_gate": False,
        "decoder_sparse_step": 1,
        "first_k_dense_replace": 0,
        "mlp_only_layers": (),
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    }


def mistral_from_config(cfg: Any) -> dict[str, Any]:
    """Mistral ``params.json`` for a moekit ``ModelConfig`` (Mixtral math only)."""
    _check_exportable(cfg, "mixtral", target="Mistral's layout (Mixtral only)")
    if cfg.tie_word_embeddings:
        raise ValueError("this model cannot be written in Mistral's layout: tie_word_embeddings=True")
    params: dict[str, Any] = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "head_dim": cfg.head_dim,
        "hidden_dim": cfg.moe_intermediate_size,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": cfg.num_key_value_heads,
        "norm_eps": cfg.rms_norm_eps,
        "vocab_size": cfg.vocab_size,
        "rope_theta": float(cfg.rope_theta),
        "max_seq_len": cfg.max_position_embeddings,
        "moe": {"num_experts_per_tok": cfg.top_k, "num_experts": cfg.num_experts},
    }
    if cfg.sliding_window is not None:
        params["sliding_window"] = cfg.sliding_window
    return params
