"""The ``moekit`` command end to end, in subprocesses, on a micro model and a few KB of text."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit.cli import main

# One worker runs the whole module, so the module-scoped run is built once.
pytestmark = pytest.mark.xdist_group("cli")

MICRO = ["--set", "hidden_size=32", "--set", "max_position_embeddings=64", "--set", "num_hidden_layers=2",
         "--set", "intermediate_size=64", "--set", "num_experts=4", "--vocab-size", "300",
         "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1", "--no-progress"]
LONG = "".join(chr(0x4E00 + 37 * i) for i in range(100))  # ~300 byte tokens > the micro context of 64
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SNIPPET = "def add(a, b):\n    return a + b\n\nclass S:\n    def push(self, x):\n        self.it.append(x)\n"


def moekit(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i in range(10):
        (root / f"f{i}.py").write_text(f"# {i}\n" + SNIPPET * (4 + i % 3), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("runs") / "micro"
    r = moekit("train", "--data", data_dir, "--out", out, "--max-steps", "3", *MICRO)
    assert r.returncode == 0, r.stderr
    assert f"run saved to {out}" in r.stdout and "step 3" in r.stdout
    return out


def test_train_writes_a_run(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"run.json", "tokenizer.json", "metrics.jsonl", "data.safetensors", "checkpoints"} <= names
    info = json.loads((run_dir / "run.json").read_text())
    assert info["train_config"]["max_steps"] == 3 and info["model_config"]["num_experts"] == 4


def test_generate_streams_one_prompt(run_dir):
    r = moekit("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ")
    quiet = moekit("generate", run_dir, "--prompt", "def ", "--max-new-tokens", "6", "--temperature", "0",
                   "--no-stream")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == r.stdout  # the same text, no block header for one prompt


def test_generate_a_batch_in_process(run_dir, capsys):
    rc = main(["generate", str(run_dir), "--prompt", "class", "--prompt", "x =", "--max-new-tokens", "4",
               "--seed", "3", "--top-k", "5", "--top-p", "0.9", "--stop", "\n\n"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "--- [0] ---\nclass" in out and "--- [1] ---\nx =" in out


@pytest.mark.parametrize(("prompts", "flags", "expected"), [
    (["a", "b"], [], "--- [0] ---\naxy\n--- [1] ---\nbz\n"),  # a batch: the blocks so far
    (["a"], ["--no-stream"], "axy\n"),
    (["a"], [], "axy\n"),  # streamed, then the line is ended
])
def test_ctrl_c_during_generation_shows_the_text_so_far(run_dir, capsys, monkeypatch, prompts, flags,
                                                        expected):
    import moekit.inference

    def interrupted(model, tokenizer, prompts, stream, **kwargs):
        stream(0, "x")
        stream(0, "y")
        if len(prompts) > 1:
            stream(1, "z")
        raise KeyboardInterrupt

    monkeypatch.setattr(moekit.inference, "generate_text", interrupted)
    argv = ["generate", str(run_dir), *(a for p in prompts for a in ("--prompt", p)), *flags]
    assert main(argv) == 130
    captured = capsys.readouterr()
    assert captured.out == expected and "interrupted" in captured.err


def test_info():
    r = moekit("info", "--preset", "mixtral-8x7b")
    assert r.returncode == 0, r.stderr
    assert "46,702,792,704" in r.stdout or "46702792704" in r.stdout


def test_info_of_a_run(run_dir, capsys):
    from moekit.models import ModelConfig
    from moekit.models.info import describe

    assert main(["info", str(run_dir)]) == 0
    config = json.loads((run_dir / "run.json").read_text())["model_config"]
    assert capsys.readouterr().out == describe(ModelConfig.from_dict(config)) + "\n"


@pytest.mark.parametrize("command", ["train", "generate", "analyze", "convert"])
def test_help_names_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: the newest) (default" not in text
    if command == "generate":
        assert "sampling temperature; 0 = greedy (default: 0.8)" in text
        assert "(row b uses seed + b) (default: 0)" in text


def test_version(capsys):
    from moekit import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"moekit {__version__}\n"


def test_errors_are_clear_and_touch_nothing(run_dir, data_dir, tmp_path, capsys):
    before = sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*"))
    cases = [
        (["train", "--data", str(data_dir), "--out", str(run_dir), "--max-steps", "3", *MICRO],
         "not empty; pass --resume"),
        (["train", "--out", str(run_dir), "--resume", "--preset", "small"], "cannot resume"),
        (["train", "--out", str(run_dir), "--resume", "--lr", "0.5"], "lr: run has"),
        (["train", "--resume"], "--resume needs --out"),
        (["generate", str(data_dir), "--prompt", "x"], "is not a moekit run"),
        (["generate", str(run_dir / "run.json"), "--prompt", "x"], "a file, not a directory"),
        (["generate", str(run_dir), "--prompt", LONG, "--max-new-tokens", "1"], "prompt"),
        (["generate", str(run_dir), "--prompt", "x", "--chat"], "--chat applies to --model PATH"),
        (["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *MICRO],
         "no such file or directory"),
        (["train", "--set", "bogus=1", "--out", str(tmp_path / "o")], "bogus"),
        (["info", "--preset", "huge"], "unknown preset"),
        (["info"], "info needs one of --preset NAME or RUN_OR_MODEL"),
        (["info", str(data_dir)], "neither config.json (Hugging Face) nor params.json (Mistral) found"),
        (["info", str(tmp_path / "nope")], "no such checkpoint directory"),
        (["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"], "no such checkpoint directory"),
        (["convert", str(tmp_path / "nope"), str(tmp_path / "o")], "no such checkpoint directory"),
    ]
    if not torch.cuda.is_available():  # checked before the run directory is made
        cases.append((["train", "--device", "cuda", "--out", str(tmp_path / "o"), *MICRO], "CUDA is not"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert err.startswith("moekit: error:") and message in err, (argv, err)
        assert out == "", (argv, out)  # e.g. no echo of a prompt that is then rejected
    assert sorted((str(p), p.stat().st_mtime_ns) for p in run_dir.rglob("*")) == before
    assert not (tmp_path / "o").exists()
    absent = "cuda:99" if torch.cuda.is_available() else "cuda:0"
    for argv, message in [(["generate", str(run_dir), "--prompt", "x", "--device", "gpu"], "--device: "),
                          (["generate", str(run_dir), "--prompt", "x", "--top-p", "1.5"], "--top-p: must be"),
                          (["generate", str(run_dir), "--prompt", "x", "--top-k", "-1"], "--top-k: must be"),
                          (["analyze", str(run_dir), "--device", absent], "--device: ")]:
        with pytest.raises(SystemExit) as exit_info:  # argparse: the usage line + one message
            main(argv)
        assert exit_info.value.code == 2
        assert f"argument {message}" in capsys.readouterr().err


def test_sigterm_saves_a_checkpoint_and_resume_continues(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "100000", "--log-every", "1",
            "--save-every", "0", *MICRO]
    proc = subprocess.Popen([sys.executable, "-m", "moekit", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted at step" in stderr + stdout
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1
    step = int(saved[0].name.split("_")[1])
    assert main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert f"resuming {out} from step {step}" in stdout and f"step {step + 2}" in stdout


def test_make_run_command_with_fewer_steps(tmp_path):
    """`make run` is `moekit train` with every default; here with 3 steps, 2 validation batches, an --out."""
    exe = Path(sys.executable).with_name("moekit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moekit"]
    args = ["train", "--max-steps", "3", "--eval-batches", "2", "--out", str(tmp_path / "run")]
    r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "corpus stdlib:" in r.stdout and f"run saved to {tmp_path / 'run'}" in r.stdout
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["model_config"]["hidden_size"] == 256 and info["data"]["source"].startswith("stdlib:")


def test_resume_compares_model_flags_with_the_run_and_can_turn_compile_off(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "1", *MICRO]) == 0
    # MICRO repeats the run's own --set values; before, they were applied to the tiny preset
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "2", "--no-compile",
                 "--set", "hidden_size=32", "--vocab-size", "300", "--no-progress"]) == 0
    assert "step 2" in capsys.readouterr().out
    assert json.loads((out / "run.json").read_text())["train_config"]["compile"] is False
    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--set", "hidden_size=48"]) == 2
    assert "hidden_size: run has 32, asked for 48" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly():
    """``moekit info | head -1``: the reader leaves early; no 'Broken pipe' error or traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        r = subprocess.run([sys.executable, "-m", "moekit", "info", "--preset", "mixtral-8x7b"], stdout=write,
                           stderr=subprocess.PIPE, text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert r.returncode == 1 and r.stderr == "", r.stderr


def test_training_into_a_closed_pipe_still_trains_and_checkpoints(data_dir, tmp_path):
    """``moekit train | head -1``: the reader leaves after the first line; the run goes on to its end."""
    read, write = os.pipe()
    os.close(read)
    out = tmp_path / "piped"
    try:
        argv = ["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "2", *MICRO]
        r = subprocess.run([sys.executable, "-m", "moekit", *argv], stdout=write, stderr=subprocess.PIPE,
                           text=True, env=ENV, timeout=300)
    finally:
        os.close(write)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr  # the run itself succeeded
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]


def test_the_training_bar_stays_out_of_logs_that_are_not_a_terminal(data_dir, tmp_path):
    argv = [a for a in MICRO if a != "--no-progress"]
    r = moekit("train", "--data", data_dir, "--out", tmp_path / "logged", "--max-steps", "2", *argv)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "step/s" not in r.stderr and "s/step" not in r.stderr, r.stderr
