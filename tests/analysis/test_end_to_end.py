"""`moekit analyze` on a tiny trained run: default data (the run's validation split), --data, errors."""

from __future__ import annotations

import json

import pytest

from moekit.analysis import load_model, run_analysis
from moekit.cli import main
from moekit.models import get_preset
from moekit.train import TrainConfig, train

from .test_report import check_report

# one worker trains the run once for every test here (make test uses --dist loadgroup)
pytestmark = pytest.mark.xdist_group("analysis_end_to_end")

TEXT = (
    "def add(a, b):\n    return a + b\n\n"
    "class Stack:\n    def __init__(self):\n        self.items = []  # storage\n\n"
    "    def push(self, x):\n        self.items.append(x)\n\n"
    "    def pop(self):\n        return self.items.pop() if self.items else None\n\n"
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the autouse fixture only covers function scope
    root = tmp_path_factory.mktemp("analysis_run")
    data = root / "data"
    data.mkdir()
    for i in range(12):
        (data / f"file{i:02d}.py").write_text(f"# file {i}\nN = {i}\n" + TEXT * (3 + i % 3), encoding="utf-8")
    model = get_preset("tiny", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, num_experts=4, top_k=2, vocab_size=300,
                       max_position_embeddings=64)
    cfg = TrainConfig(max_steps=4, batch_size=2, seq_len=32, warmup_steps=1, eval_every=2, eval_batches=1,
                      save_every=2, log_every=1, max_train_chars=20_000, max_val_chars=4_000,
                      tokenizer_chars=10_000, val_fraction=0.2)
    train(root / "run", model_config=model, train_config=cfg, data=data, show_progress=False,
          log=lambda s: None)
    torch.set_num_threads(before)
    return root


def test_cli_analyze_default_data(tiny_run, capsys):
    out = tiny_run / "report_default"
    rc = main(["analyze", str(tiny_run / "run"), "--out", str(out), "--max-tokens", "512",
               "--layers", "0", "2"])
    assert rc == 0
    printed, err = capsys.readouterr()
    assert "window" in err  # the progress bar over the model's passes
    assert "routing summary" in printed and "validation split" in printed and "report.html" in printed
    parser = check_report(out / "report.html")
    assert len(parser.images) == 6  # training curves from the run's metrics.jsonl included
    text = "".join(parser.text)
    assert "No training metrics" not in text and "No Python code" not in text
    saved = json.loads((out / "metrics.json").read_text())
    assert [m["layer"] for m in saved["per_layer"]] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert saved["info"]["kind"] == "run" and saved["info"]["step"] == 4
    assert 0 < saved["overall"]["loss"] < 10
    assert saved["overall"]["tokens"] == 512


def test_default_texts_are_the_runs_validation_documents(tiny_run, tmp_path, monkeypatch):
    """Decoded from the run's data.safetensors: the same documents training validated on, even when
    the corpus has moved and analyze runs from another directory."""
    from moekit.analysis.analyze import load_model, load_texts
    from moekit.train.corpus import load_corpus

    _, tokenizer, info = load_model(tiny_run / "run")
    corpus = load_corpus(tiny_run / "data", val_fraction=0.2, max_train_chars=1, max_val_chars=4_000)
    monkeypatch.chdir(tmp_path)
    (tiny_run / "data").rename(tiny_run / "moved")
    try:
        texts, desc = load_texts(None, info, max_chars=10**6, tokenizer=tokenizer)
    finally:
        (tiny_run / "moved").rename(tiny_run / "data")
    assert texts == [d.text for d in corpus.validation] and desc.endswith("(validation split)")


def test_one_document_is_enough_to_analyse(tiny_run, tmp_path):
    from moekit.analysis.analyze import load_texts

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.py").write_text(TEXT)
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    for data in (tmp_path / "one", tmp_path / "one.jsonl"):
        assert load_texts(data, {}, max_chars=10**6)[0] == [TEXT]


@pytest.mark.parametrize("extra", ["__init__.py", "logo.png", "notes.txt"])
def test_a_folder_with_skipped_files_is_analysed_whole(tmp_path, extra):
    """An empty, binary or non-UTF-8 file beside the text files (a package folder): every readable file
    is analysed, whichever split the skipped one's hash would have filled (was 'corpus is empty')."""
    from moekit.analysis.analyze import load_texts

    data = tmp_path / "proj"
    data.mkdir()
    texts = [TEXT, TEXT.replace("def", "async def")]
    for name, text in zip(("cli.py", "moe.py"), texts):
        (data / name).write_text(text)
    content = {"__init__.py": b"", "logo.png": bytes(range(256)) * 4,
               "notes.txt": "caf\xe9".encode("latin-1")}
    (data / extra).write_bytes(content[extra])
    assert sorted(load_texts(data, {}, max_chars=10**6)[0]) == sorted(texts)


def test_a_data_file_that_is_not_utf8_is_refused_as_train_refuses_it(tmp_path):
    from moekit.analysis.analyze import load_texts

    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(invalid continuation byte"):
        load_texts(tmp_path / "latin1.txt", {"kind": "checkpoint"}, max_chars=1000)  # was read with U+FFFD


def test_run_analysis_with_data_file(tiny_run):
    src = tiny_run / "data" / "file03.py"
    analysis, report = run_analysis(tiny_run / "run", data=src, out_dir=tiny_run / "report_file",
                                    max_tokens=256, seq_len=16, step=2, log=lambda s: None)
    assert analysis.info["step"] == 2
    assert analysis.info["documents"] == 1 and analysis.info["python_documents"] == 1
    assert analysis.detail_layers == ["model.layers.0.mlp", "model.layers.1.mlp", "model.layers.2.mlp"]
    assert analysis.info["tokens"] == 256
    check_report(report)


def test_analyze_hf_checkpoint_needs_data(tiny_run, capsys):
    from moekit.hf import HFTokenizer, save_pretrained

    model, tok, _ = load_model(tiny_run / "run")
    ckpt = save_pretrained(model, tiny_run / "hf", tokenizer=HFTokenizer(tok, {"eos_token": "<|endoftext|>"}))
    assert main(["analyze", str(ckpt)]) == 2
    assert "pass --data" in capsys.readouterr().err
    out = tiny_run / "report_hf"
    assert main(["analyze", str(ckpt), "--data", str(tiny_run / "data"), "--out", str(out),
                 "--max-tokens", "256", "--seq-len", "32", "--no-progress"]) == 0
    assert "window" not in capsys.readouterr().err
    parser = check_report(out / "report.html")
    assert "No training metrics" in "".join(parser.text)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["info"]["kind"] == "checkpoint" and saved["overall"]["tokens"] == 256


def test_load_model_dispatch_and_errors(tiny_run, tmp_path, capsys):
    model, tok, info = load_model(tiny_run / "run")
    assert info["kind"] == "run" and tok.get_vocab_size() <= 300
    assert main(["analyze", str(tmp_path)]) == 2
    assert "neither a moekit run" in capsys.readouterr().err
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["analyze", str(tiny_run / "run" / "run.json")]) == 2
    assert "a file, not a directory" in capsys.readouterr().err
    for flags, message in ((["--layers", "7"], "not MoE layers"), (["--batch-size", "0"], "batch_size")):
        assert main(["analyze", str(tiny_run / "run"), *flags, "--out", str(tmp_path / "x"),
                     "--max-tokens", "64"]) == 2
        out, err = capsys.readouterr()
        assert message in err and "analyzing" not in out  # refused before the data is read
    assert main(["analyze", str(tiny_run / "run"), "--seq-len", "999"]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["analyze", str(tiny_run / "run"), "--step", "3"]) == 2
    assert "no checkpoint of step 3" in capsys.readouterr().err
