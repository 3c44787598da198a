"""Sampling: top-k / top-p filters against plain references, draw frequencies, seeds, errors."""

import math

import pytest
import torch

from moekit.inference import SamplingConfig, filter_logits, sample
from moekit.inference.sampling import make_generators


def top_p_reference(logits, p):
    """Keep the most likely tokens, in order, until their probability reaches p (plain Python)."""
    probs = torch.softmax(logits.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, total = set(), 0.0
    for i in order:
        if total >= p:
            break
        kept.add(i)
        total += probs[i]
    return kept


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = filter_logits(logits, 2, None)
    assert torch.isfinite(out).tolist() == [
        [False, True, False, True, False],
        [True, True, False, False, False],
    ]
    assert torch.equal(filter_logits(logits, 5, None), logits)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9, 0.999])
def test_top_p_matches_reference(p):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(0)) * 2
    out = filter_logits(logits, None, p)
    for row in range(4):
        kept = {i for i in range(30) if math.isfinite(out[row, i].item())}
        assert kept == top_p_reference(logits[row], p)


def test_greedy_is_argmax():
    logits = torch.randn(3, 11)
    assert torch.equal(sample(logits, SamplingConfig(), None), logits.argmax(-1))


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 30
    for temperature in (5e-324, 1e-46, 1e-40, 1e-20, 1e-6):  # below float32's range too
        cfg = SamplingConfig(temperature=temperature, seed=0)
        token = sample(logits, cfg, make_generators(cfg, 4, torch.device("cpu")))
        assert torch.equal(token, logits.argmax(-1)), temperature


def test_sample_frequencies_follow_the_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    cfg = SamplingConfig(temperature=1.0, seed=0)
    gens = make_generators(cfg, 1, torch.device("cpu"))
    n = 4000
    draws = torch.stack([sample(probs.log()[None], cfg, gens)[0] for _ in range(n)])
    freq = torch.bincount(draws, minlength=4).double() / n
    assert (freq - probs.double()).abs().max() < 0.03  # ~4 standard errors at n = 4000


def test_temperature_and_filters_restrict_the_draws():
    logits = torch.tensor([[4.0, 3.9, 0.0, -2.0, 1.0]])
    cfg = SamplingConfig(temperature=5.0, top_k=2, seed=1)
    gens = make_generators(cfg, 1, torch.device("cpu"))
    draws = {sample(logits, cfg, gens).item() for _ in range(200)}
    assert draws == {0, 1}  # high temperature flattens the two survivors, the others never appear


def test_rows_use_seed_plus_row():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(5))
    cfg = SamplingConfig(temperature=1.0, seed=7)
    batch = sample(logits, cfg, make_generators(cfg, 3, torch.device("cpu")))
    for b in range(3):
        single_cfg = SamplingConfig(temperature=1.0, seed=7 + b)
        single = sample(logits[b : b + 1], single_cfg, make_generators(single_cfg, 1, torch.device("cpu")))
        assert single.item() == batch[b].item()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(temperature=-0.1), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(seed=1.5), "seed"),
        (dict(seed=-1), "seed"),
        (dict(seed=2**64), "seed"),
    ],
)
def test_sampling_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**kw)


def test_numpy_scalars_are_numbers():
    import numpy as np

    cfg = SamplingConfig(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9),
                         seed=np.int64(3))
    assert cfg == SamplingConfig(temperature=0.5, top_k=5, top_p=0.9, seed=3)
    assert type(cfg.temperature) is float and type(cfg.top_k) is int
