"""Hugging Face and Mistral checkpoints: load, save, convert, tokenizers with chat templates.

Public API::

    model = moekit.from_pretrained("path/or/org-name", dtype=None, device="cpu")   # MoEForCausalLM
    tok = moekit.load_tokenizer("path")             # HFTokenizer (tokenizers.Tokenizer + chat template)
    model.save_pretrained("out", max_shard_size="5GB")                           # transformers-loadable
    moekit.hf.convert("src", "dst", to="hf" | "mistral")

Supported: ``model_type`` mixtral (v4 per-expert and v5 stacked layouts), qwen2_moe, qwen3_moe,
olmoe; Mistral's
``params.json`` + ``consolidated*.safetensors``. Safetensors only: pickle checkpoints are refused.
"""

from moekit.hf.checkpoint import CheckpointError
from moekit.hf.keymap import KeyMapError
from moekit.hf.load import from_pretrained, read_config
from moekit.hf.save import convert, save_mistral, save_pretrained, save_tokenizer
from moekit.hf.tokenizer import HFTokenizer, TokenizerNotFoundError, load_tokenizer

__all__ = [
    "CheckpointError",
    "HFTokenizer",
    "KeyMapError",
    "TokenizerNotFoundError",
    "convert",
    "from_pretrained",
    "load_tokenizer",
    "read_config",
    "save_mistral",
    "save_pretrained",
    "save_tokenizer",
]
