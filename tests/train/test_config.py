import math

import pytest

from moekit.train.config import TrainConfig, resume_train_config


def test_warmup_then_cosine_to_the_floor():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4)
    assert cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(10) == pytest.approx(1e-3)
    assert cfg.lr_at(60) == pytest.approx(1e-4 + 0.5 * 9e-4)  # halfway through the cosine
    assert cfg.lr_at(110) == pytest.approx(1e-4)
    lrs = [cfg.lr_at(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert TrainConfig(warmup_steps=0, max_steps=4).lr_at(0) == pytest.approx(TrainConfig().lr)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_steps": 0}, "max_steps"), ({"lr": -1.0}, "lr"), ({"lr": math.inf}, "lr"),
     ({"beta2": 1.0}, "beta2"), ({"device": "tpu"}, "device"), ({"seq_len": 1}, "seq_len"),
     ({"max_train_chars": 0}, "max_train_chars"), ({"min_lr_ratio": 2.0}, "min_lr_ratio")],
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
