"""Shared micro configurations: a 2-layer MoE small enough for a training step in milliseconds."""

from __future__ import annotations

import pytest

from moekit.models import get_preset
from moekit.train import TrainConfig

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n\n"
    "    def pop(self):\n        return self.items.pop()\n\n"
)


def micro_model(**overrides):
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, num_experts=4, top_k=2, vocab_size=300, max_position_embeddings=64)
    cfg.update(overrides)
    return get_preset("tiny", **cfg)


def micro_train(**overrides) -> TrainConfig:
    cfg = dict(max_steps=6, batch_size=2, seq_len=32, warmup_steps=2, eval_every=3, eval_batches=2,
               save_every=3, log_every=1, max_train_chars=20_000, max_val_chars=4_000, tokenizer_chars=10_000)
    cfg.update(overrides)
    return TrainConfig(**cfg)


@pytest.fixture
def text_dir(tmp_path):
    """A directory of small text files (a few KB: enough for many 32-token windows)."""
    root = tmp_path / "data"
    root.mkdir()
    for i in range(12):
        (root / f"file{i:02d}.py").write_text(f"# file {i}\n" + TEXT * (3 + i % 3), encoding="utf-8")
    return root

