"""Generation: static KV cache, prefill / decode_one_token, sampling, batched and text-level generate."""

from moekit.inference.cache import StaticKVCache
from moekit.inference.generate import compiled_decode_one_token, decode_one_token, generate, prefill
from moekit.inference.sampling import SamplingConfig, filter_logits, sample
from moekit.inference.text import generate_text

__all__ = [
    "SamplingConfig",
    "StaticKVCache",
    "compiled_decode_one_token",
    "decode_one_token",
    "filter_logits",
    "generate",
    "generate_text",
    "prefill",
    "sample",
]
