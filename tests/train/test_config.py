import math

import pytest

from moekit.train.config import TrainConfig, resume_train_config


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)  # the peak, once
    assert cfg.lr_at(10) < 1e-3
    assert cfg.lr_at(59) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert cfg.lr_at(109) == pytest.approx(1e-4)  # the last step runs at the floor
    lrs = [cfg.lr_at(s) for s in range(9, 110)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    no_warmup = TrainConfig(warmup_steps=0, max_steps=4)
    assert no_warmup.lr_at(0) == pytest.approx(no_warmup.lr)
    assert no_warmup.lr_at(3) == pytest.approx(no_warmup.lr * no_warmup.min_lr_ratio)
    short = TrainConfig(warmup_steps=1, max_steps=2, lr=1.0, min_lr_ratio=0.1)
    assert [short.lr_at(0), short.lr_at(1)] == pytest.approx([1.0, 0.1])


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_steps": 0}, "max_steps"), ({"lr": -1.0}, "lr"), ({"lr": math.inf}, "lr"),
     ({"beta2": 1.0}, "beta2"), ({"device": "tpu"}, "device"), ({"device": "cuda:abc"}, "device"),
     ({"seq_len": 1}, "seq_len"), ({"lr": True}, "lr"), ({"weight_decay": math.inf}, "weight_decay"),
     ({"min_lr_ratio": "0.1"}, "min_lr_ratio"), ({"compile": 1}, "compile"),
     ({"max_train_chars": 0}, "max_train_chars"), ({"min_lr_ratio": 2.0}, "min_lr_ratio"),
     ({"seed": 2**64}, "seed must be < 2"), ({"max_train_chars": True}, "max_train_chars")],
)
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**kwargs)


def test_dict_round_trip_and_unknown_keys():
    cfg = TrainConfig(max_steps=7, lr=1e-4)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="bogus"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_resume_allows_budget_changes_but_not_identity_changes():
    saved = TrainConfig(max_steps=10, lr=1e-3)
    assert resume_train_config(saved, {"max_steps": 20, "eval_every": 5, "lr": 1e-3}).max_steps == 20
    with pytest.raises(ValueError, match="lr: run has 0.001, asked for 0.002"):
        resume_train_config(saved, {"lr": 2e-3})
