import json
import os
import signal

import pytest
import torch

from moekit.train import list_checkpoints, load_run, train

from .conftest import micro_model, micro_train


def _run(out, data, **kwargs):
    kwargs.setdefault("model_config", micro_model())
    kwargs.setdefault("train_config", micro_train())
    return train(out, data=data, show_progress=False, log=lambda s: None, **kwargs)


def test_training_lowers_the_loss_and_writes_metrics(tmp_path, text_dir):
    losses = []
    result = _run(tmp_path / "run", text_dir, train_config=micro_train(max_steps=25, eval_every=0, lr=1e-2),
                  on_step=lambda step, m: losses.append(m["loss"]))
    assert len(losses) == 25 and result.step == 25 and not result.interrupted
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["split"] == "train"]
    assert [x["step"] for x in train_lines] == list(range(1, 26))
    last = train_lines[-1]
    assert last["loss"] == result.loss and last["aux_loss"] > 0 and last["tokens_per_s"] > 0
    assert len(last["expert_load"]) == 2 and all(len(layer) == 4 for layer in last["expert_load"])
    assert all(sum(layer) == pytest.approx(1.0) for layer in last["expert_load"])
    assert last["load_cv"] == pytest.approx(sum(last["load_cv_per_layer"]) / 2)
    assert [x["step"] for x in lines if x["split"] == "validation"] == [25]
    assert result.val_loss == lines[-1]["val_loss"]


def test_resume_is_bit_exact(tmp_path, text_dir):
    full = _run(tmp_path / "full", text_dir)

    def interrupt_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does: finish the step, save, stop

    cut = _run(tmp_path / "cut", text_dir, train_config=micro_train(save_every=0), on_step=interrupt_at_3)
    assert cut.interrupted and cut.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3]
    resumed = train(tmp_path / "cut", resume=True, show_progress=False, log=lambda s: None)
    assert resumed.step == 6 and not resumed.interrupted
    assert resumed.loss == full.loss and resumed.val_loss == full.val_loss
    a, _, _ = load_run(tmp_path / "full")
    b, _, _ = load_run(tmp_path / "cut")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)


def test_load_run_and_run_json(tmp_path, text_dir):
    result = _run(tmp_path / "run", text_dir, train_config=micro_train(max_steps=2))
    model, tokenizer, info = load_run(tmp_path / "run")
    assert info["step"] == 2 and info["format"] == "moekit-run"
    assert info["model_config"]["eos_token_id"] == tokenizer.token_to_id("<|endoftext|>")
    assert info["data"]["source"] == str(text_dir)
    assert not model.training
    assert result.checkpoint == list_checkpoints(tmp_path / "run")[-1][1]


def test_new_run_refuses_a_non_empty_out(tmp_path, text_dir):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty; pass --resume"):
        _run(out, text_dir)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_resume_errors(tmp_path, text_dir):
    with pytest.raises(ValueError, match="is not a moekit run"):
        train(text_dir, resume=True, show_progress=False)
    _run(tmp_path / "run", text_dir, train_config=micro_train(max_steps=2))
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="model configuration.*hidden_size: run has 32, asked for 48"):
        train(tmp_path / "run", resume=True, model_config=micro_model(hidden_size=48), show_progress=False)
    with pytest.raises(ValueError, match="another configuration.*batch_size"):
        train(tmp_path / "run", resume=True, train_changes={"batch_size": 3}, show_progress=False)
    with pytest.raises(ValueError, match="trained on"):
        train(tmp_path / "run", resume=True, data=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="newest checkpoint is at step 2 and --max-steps is 2"):
        train(tmp_path / "run", resume=True, show_progress=False)  # nothing left to train
    with pytest.raises(ValueError, match="train_config is for a new run"):  # not silently ignored
        train(tmp_path / "run", resume=True, train_config=micro_train(max_steps=4, lr=0.5),
              show_progress=False)
    damaged = list_checkpoints(tmp_path / "run")[-1][1] / "optimizer.json"
    damaged.write_text("{")
    before[damaged] = b"{"
    with pytest.raises(ValueError, match="is damaged"):  # a failed resume leaves run.json as it was
        train(tmp_path / "run", resume=True, train_changes={"max_steps": 4}, show_progress=False)
    after = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before  # nothing overwritten
    state = damaged.parent / "state.json"
    state.write_text("{bad")
    with pytest.raises(ValueError, match=r"step_0000002 is damaged \(state.json: "):  # not json's own message
        train(tmp_path / "run", resume=True, train_changes={"max_steps": 4}, show_progress=False)
    state.write_text('{"rng": {}}')  # valid JSON without its entries: no KeyError traceback
    with pytest.raises(ValueError, match=r"is damaged \(state.json: no step, data\)"):
        train(tmp_path / "run", resume=True, train_changes={"max_steps": 4}, show_progress=False)


def test_resume_accepts_the_data_path_spelled_otherwise_and_a_torn_metrics_line(tmp_path, text_dir,
                                                                               monkeypatch):
    _run(tmp_path / "run", text_dir, train_config=micro_train(max_steps=2))
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "split": "tr')  # a line cut short by a crash
    monkeypatch.chdir(tmp_path)
    said = []
    result = train("run", resume=True, data=f"{text_dir.name}/", train_changes={"max_steps": 3},
                   show_progress=False, log=said.append)
    assert result.step == 3
    assert any("cosine schedule now ends at step 3, not 2" in line for line in said), said
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line)["step"] <= 3 for line in lines)


def test_data_errors_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        _run(tmp_path / "out", tmp_path / "missing")
    (tmp_path / "small.txt").write_text("a\n" * 3000)
    with pytest.raises(ValueError, match="seq-len"):
        _run(tmp_path / "out", tmp_path / "small.txt", train_config=micro_train(seq_len=128))
    assert not (tmp_path / "out").exists()



def test_a_failed_set_up_leaves_an_empty_out_empty(tmp_path, text_dir, monkeypatch, capsys):
    """A full disk after the tokenizer was written: the user's empty --out is empty again (the next
    run can use it), and the CLI says so in one line (safetensors' error is not an OSError)."""
    from safetensors import SafetensorError

    from moekit.cli import main

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("moekit.train.prepare.save_file", full_disk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafetensorError):
        _run(tmp_path / "empty", text_dir)
    assert list((tmp_path / "empty").iterdir()) == []
    assert main(["train", "--data", str(text_dir), "--out", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("moekit: error: Error while serializing")
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_diverging_run_stops_before_a_non_finite_update(tmp_path, text_dir):
    from moekit.train import TrainingDiverged

    config = micro_train(max_steps=40, lr=1e4, grad_clip=0.0, warmup_steps=0, save_every=1, keep_last=2)
    with pytest.raises(TrainingDiverged, match="training diverged at step .*newest checkpoint"):
        _run(tmp_path / "run", text_dir, train_config=config)
    for _, path in list_checkpoints(tmp_path / "run"):
        state = load_run(tmp_path / "run", step=int(path.name.split("_")[1]))[0].state_dict()
        assert all(torch.isfinite(t).all() for t in state.values())
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all("NaN" not in line and "Infinity" not in line for line in lines)


def test_a_model_too_big_for_the_machine_is_refused_before_writing(tmp_path, text_dir, monkeypatch):
    from moekit.models import get_preset
    from moekit.train import loop

    with pytest.raises(ValueError, match=r"46\.70 B parameters: training it needs about 696 GiB"):
        monkeypatch.setattr(loop, "_memory_bytes", lambda device: 128 * 2**30)
        _run(tmp_path / "out", text_dir, model_config=get_preset("mixtral-8x7b"))
    monkeypatch.setattr(loop, "_memory_bytes", lambda device: 2**20)  # 1 MiB: even the micro model
    with pytest.raises(ValueError, match="more than the 0 GiB of cpu.*nothing was written"):
        _run(tmp_path / "out", text_dir)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(loop, "_memory_bytes", lambda device: None)  # unknown: no check
    _run(tmp_path / "out", text_dir, train_config=micro_train(max_steps=1))


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, text_dir):
    _run(tmp_path / "run", text_dir, train_config=micro_train(max_steps=2))
    state_file = list_checkpoints(tmp_path / "run")[-1][1] / "state.json"
    state = json.loads(state_file.read_text())
    assert state["model_config"]["hidden_size"] == 32 and state["train_config"]["max_steps"] == 2
    state["model_config"]["num_experts"] = 8
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="another model configuration.*num_experts"):
        train(tmp_path / "run", resume=True, train_changes={"max_steps": 4}, show_progress=False)


def test_sigmoid_bias_routers_update_their_bias_after_each_step(tmp_path, text_dir):
    gamma = 1e-2
    _run(tmp_path / "run", text_dir, model_config=micro_model(router="sigmoid_bias", bias_update_rate=gamma),
         train_config=micro_train(max_steps=3, eval_every=0, save_every=0))
    model, _, _ = load_run(tmp_path / "run")
    for moe in model.moe_layers():
        bias = moe.gate.e_score_correction_bias
        steps = bias / gamma  # each step moves each expert's bias by -gamma, 0 or +gamma
        assert bias.abs().sum() > 0 and bias.abs().max() <= 3 * gamma + 1e-6
        torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)


def test_metrics_count_routed_slots_and_the_capacity_drop_rate(tmp_path, text_dir):
    """expert_load / load_cv describe the router's choice (before drops); drop_rate what a capacity
    dropped. Top-1 with capacity_factor 0.5: at least half of the slots cannot fit."""
    _run(tmp_path / "cap", text_dir, model_config=micro_model(router="switch", top_k=1, capacity_factor=0.5),
         train_config=micro_train(max_steps=2, eval_every=0, save_every=0))
    _run(tmp_path / "free", text_dir, train_config=micro_train(max_steps=2, eval_every=0, save_every=0))
    for name, dropping in (("cap", True), ("free", False)):
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        for line in (x for x in lines if x["split"] == "train"):
            assert all(sum(layer) == pytest.approx(1.0) for layer in line["expert_load"])
            if dropping:
                assert line["drop_rate"] >= 0.5 - 1e-9
            else:
                assert line["drop_rate"] == 0.0


def test_sigterm_while_preparing_removes_the_half_made_run(tmp_path, text_dir, monkeypatch):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("this process has its own SIGTERM handler (the run keeps it)")

    def terminated(out, *args, **kwargs):
        (out / "tokenizer.json").write_text("{}")  # a part of the run written, then the signal
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr("moekit.train.loop.prepare_run", terminated)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "run", text_dir)
    assert not (tmp_path / "run").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
