"""Tiny random transformers MoE models (the peer of every test here) and a tiny tokenizer."""

from __future__ import annotations

import torch

TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_hf(kind: str, seed: int = 0, **overrides):
    """A random Mixtral / Qwen2Moe / Qwen3Moe / OlmoeForCausalLM in eval mode.

    Weights are widened (std 0.1) and norms / biases perturbed so routing, attention and every
    RMSNorm weight matter; eos/bos are None so greedy generation runs its full length.
    """
    import transformers

    common = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
                  pad_token_id=0)
    if kind == "mixtral":
        cls, specific = transformers.MixtralForCausalLM, dict(
            intermediate_size=40, num_local_experts=4, num_experts_per_tok=2)
    elif kind == "qwen2_moe":
        cls, specific = transformers.Qwen2MoeForCausalLM, dict(
            num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=24,
            shared_expert_intermediate_size=36, num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1])
    elif kind == "qwen3_moe":  # head_dim 12 != hidden / heads, as in the released Qwen3-MoE models
        cls, specific = transformers.Qwen3MoeForCausalLM, dict(
            num_hidden_layers=3, head_dim=12, intermediate_size=48, moe_intermediate_size=20, num_experts=6,
            num_experts_per_tok=3, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0])
    elif kind == "olmoe":
        cls, specific = transformers.OlmoeForCausalLM, dict(intermediate_size=24, num_experts=8,
                                                           num_experts_per_tok=4)
    else:
        raise ValueError(kind)
    cfg = cls.config_class(**{**common, **specific, **overrides})
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
            else:  # norms (ones) and biases (zeros)
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_tokenizer():
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on a few sentences, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["Hello, how are you? I am fine, thank you.", "You are a helpful assistant.",
            "What is a mixture of experts? A router sends each token to two experts.",
            '{"name": "get_weather", "parameters": {"city": "Paris"}}'] * 5
    tok.train_from_iterator(text, trainer)
    return tok
