"""Shared pieces of the analysis tests: a toy model holding ``moekit.MoE`` layers and a small BPE
tokenizer (one torch thread per test comes from tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn

import moekit
from moekit.core.config import MoEConfig

D = 16
SRC = (
    "class Stack:\n"
    "    def push(self, x=1.5):  # add\n"
    "        self.items.append('a' + x)\n"
    "\n"
    "    def pop(self):\n"
    "        return self.items.pop()\n"
)



class Block(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.mlp = moekit.MoE(cfg)

    def forward(self, x):
        y, _ = self.mlp(x)
        return x + y


class Toy(nn.Module):
    """Embedding -> 3 blocks (MoE in 0 and 2, a dense layer in 1); keeps every RoutingInfo it saw."""

    def __init__(self, vocab: int = 50, **moe) -> None:
        super().__init__()
        cfg = MoEConfig(hidden_size=D, intermediate_size=32, **moe)
        self.embed = nn.Embedding(vocab, D)
        self.layers = nn.ModuleList([Block(cfg), nn.Linear(D, D), Block(cfg)])
        self.seen: dict[str, list] = {"layers.0.mlp": [], "layers.2.mlp": []}
        for name in self.seen:
            self.get_submodule(name).register_forward_hook(
                lambda m, a, out, name=name: self.seen[name].append(out.routing))

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.fixture
def make_toy():
    def make(**kw):
        torch.manual_seed(0)
        return Toy(**kw)

    return make


def train_bpe(texts, vocab: int = 300) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.fixture
def bpe():
    """``bpe(texts, vocab=300)`` -> a byte-level BPE ``tokenizers.Tokenizer`` with ``<|endoftext|>``."""
    return train_bpe


@pytest.fixture
def python_source() -> str:
    return SRC
