import random

import pytest
import torch

from moekit.train import checkpoint as ck


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 11))
    model[2].weight = model[0].weight  # tied, stored once
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.9))
    for _ in range(2):
        model(torch.tensor([1, 2, 3])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_load_round_trip_is_exact(tmp_path):
    model, opt = _model_and_opt(0)
    path = ck.save_checkpoint(tmp_path, 5, model, opt, {"data": {"position": 3}})
    other, other_opt = _model_and_opt(1)
    state = ck.load_checkpoint(path, other, other_opt)
    assert state == {"data": {"position": 3}, "step": 5}
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    assert other[2].weight is other[0].weight
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, values in sa["state"].items():
        for name, value in values.items():
            assert torch.equal(value, sb["state"][pid][name]), name


def test_keep_last_and_no_temporary_left(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]
    ck.save_checkpoint(tmp_path, 4, model, opt, {"again": True}, keep_last=2)  # re-save the same step
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    with pytest.raises(ValueError, match="keep_last"):
        ck.save_checkpoint(tmp_path, 5, model, opt, {}, keep_last=0)


def test_a_failed_write_leaves_earlier_checkpoints_untouched(tmp_path, monkeypatch):
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 1, model, opt, {"ok": 1}, keep_last=1)
    before = (tmp_path / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ck.save_checkpoint(tmp_path, 2, model, opt, {}, keep_last=1)
    # the half-written step 2 is invisible; step 1 is still complete and was not pruned
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1]
    assert (tmp_path / "checkpoints" / "step_0000001" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "checkpoints" / "step_0000002").exists()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000001"]  # no temporary left


def test_a_crash_while_a_step_is_saved_again_keeps_that_step(tmp_path, monkeypatch):
    """Re-saving a step moves the old copy aside before the new one takes its place; a crash in
    between leaves only the old copy: it still counts, and the next save puts it back."""
    model, opt = _model_and_opt()
    ck.save_checkpoint(tmp_path, 3, model, opt, {"first": True}, keep_last=1)
    real_replace = ck.os.replace

    def crash_before_the_new_copy_lands(src, dst):
        if str(src).rsplit("/", 1)[-1].startswith(".tmp-step_"):
            raise KeyboardInterrupt  # killed between moving the old copy aside and the new one in
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_before_the_new_copy_lands)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 3, model, opt, {"second": True}, keep_last=1)
    monkeypatch.setattr(ck.os, "replace", real_replace)
    assert not (tmp_path / "checkpoints" / "step_0000003").exists()
    [(step, path)] = ck.list_checkpoints(tmp_path)
    assert step == 3 and ck.load_checkpoint(path, _model_and_opt(1)[0])["first"]
    ck.save_checkpoint(tmp_path, 4, model, opt, {}, keep_last=2)  # tidies: step 3 back in place
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000003", "step_0000004"]


def test_rng_round_trip():
    state = ck.capture_rng_state()
    a = (random.random(), torch.rand(3))
    ck.restore_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_load_errors(tmp_path):
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match="not a moekit checkpoint"):
        ck.load_checkpoint(tmp_path, model)
    path = ck.save_checkpoint(tmp_path, 1, model, None, {})
    with pytest.raises(ValueError, match="no optimizer state"):
        ck.load_checkpoint(path, model, opt)
    bigger = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 6),
                                 torch.nn.Linear(6, 11))
    with pytest.raises(ValueError, match=r"does not fit this model: size mismatch for \d\.\w+: copying"):
        ck.load_checkpoint(path, bigger)  # the mismatching tensor named, not torch's heading line alone


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "optimizer.json",
                                  "state.json"])
def test_a_damaged_file_names_the_checkpoint_and_the_way_out(tmp_path, name):
    model, opt = _model_and_opt()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, {})
    file = path / name
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # e.g. a disk that filled up
    with pytest.raises(ValueError, match=rf"checkpoint .*step_0000001 is damaged \({name}: .*previous"):
        ck.load_checkpoint(path, model, opt)


def test_damaged_token_streams_are_named(tmp_path):
    from moekit.train.prepare import load_tokens

    (tmp_path / "data.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(ValueError, match="data.safetensors is damaged .*cannot be resumed"):
        load_tokens(tmp_path)


def test_a_run_directory_in_use_is_refused_and_a_stale_lock_taken_over(tmp_path):
    import os
    import socket

    from moekit.train.run import LOCK_FILE, claim_run_dir

    out = tmp_path / "run"
    with claim_run_dir(out, new=True):
        assert (out / LOCK_FILE).read_text().split() == [str(os.getpid()), socket.gethostname()]
        busy = pytest.raises(ValueError, match="is in use by another moekit run")
        with busy, claim_run_dir(out, new=False):
            pass
        (out / "run.json").write_text("{}")  # the run got written: kept after the lock is released
    assert not (out / LOCK_FILE).exists() and (out / "run.json").exists()
    (out / LOCK_FILE).write_text(f"{2**22 + 12345} {socket.gethostname()}\n")  # a dead process's lock
    with claim_run_dir(out, new=False):
        assert (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    fresh = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt), claim_run_dir(fresh, new=True):
        raise KeyboardInterrupt  # e.g. Ctrl-C while the corpus is prepared: nothing is left behind
    assert not fresh.exists()
    nested = tmp_path / "a" / "b" / "run"  # parents it created go too; existing ones stay
    with pytest.raises(ValueError), claim_run_dir(nested, new=True):
        raise ValueError("the corpus is empty")
    assert not (tmp_path / "a").exists() and tmp_path.is_dir()
