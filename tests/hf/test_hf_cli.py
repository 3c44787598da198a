"""`moekit generate --model PATH [--chat]` and `moekit convert`: replies equal transformers' greedy ones."""

import io

import pytest
import torch

from moekit.cli import main
from moekit.hf import from_pretrained, load_tokenizer
from moekit.hf.chat import chat_loop, stop_token_ids

from .builders import tiny_hf, tiny_tokenizer
from .test_hf_chat_template import CHATML, THINKING

transformers = pytest.importorskip("transformers")
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat-ckpt")
    tok = tiny_tokenizer()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                  chat_template=CHATML)
    hf = tiny_hf("mixtral", seed=5, vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                 eos_token_id=hf_tok.eos_token_id)
    hf.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path, hf, hf_tok


def _hf_reply(hf, hf_tok, messages, **template_vars):
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                     **template_vars)
    ids = torch.tensor([list(ids)])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                      pad_token_id=0, eos_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:]
    return hf_tok.decode(out, skip_special_tokens=True)


def test_chat_turn_from_cli_equals_transformers(ckpt, capsys):
    path, hf, hf_tok = ckpt
    expected = _hf_reply(hf, hf_tok, [{"role": "user", "content": "Hello, how are you?"}])
    assert main(["generate", "--model", str(path), "--chat", "--prompt", "Hello, how are you?",
                 "--temperature", "0", "--max-new-tokens", str(NEW)]) == 0
    assert capsys.readouterr().out == f"> Hello, how are you?\n{expected}\n"


def test_template_vars_reach_the_chat_template(ckpt, tmp_path, capsys):
    import shutil

    path, hf, hf_tok = ckpt
    shutil.copytree(path, tmp_path / "thinking")
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(path)
    hf_tok.chat_template = THINKING
    hf_tok.save_pretrained(tmp_path / "thinking")
    messages = [{"role": "user", "content": "Hello"}]
    no_thinking = (["--template-var", "enable_thinking=false"], {"enable_thinking": False})
    for extra, template_vars in ([], {}), no_thinking:
        expected = _hf_reply(hf, hf_tok, messages, **template_vars)
        assert main(["generate", "--model", str(tmp_path / "thinking"), "--chat", "--prompt", "Hello",
                     "--temperature", "0", "--max-new-tokens", str(NEW), *extra]) == 0
        assert capsys.readouterr().out == f"> Hello\n{expected}\n"
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                      enable_thinking=False).endswith("<think>\n\n</think>\n\n")
    for argv, message in [(["--template-var", "tools=[]", "--chat"], "set by moekit itself"),
                          (["--template-var", "x"], "expects KEY=VALUE"),
                          (["--template-var", "x=1"], "applies to --chat")]:
        assert main(["generate", "--model", str(path), "--prompt", "Hi", *argv]) == 2
        assert message in capsys.readouterr().err


def test_interactive_multi_turn(ckpt):
    path, hf, hf_tok = ckpt
    model, tok = from_pretrained(path), load_tokenizer(path)
    lines = iter(["What is a mixture of experts?", "", "/reset", "Hello", "Thank you", "/exit", "never"])
    out = io.StringIO()
    messages = chat_loop(model, tok, stop_ids=stop_token_ids(model, tok), system="You are helpful.",
                         read=lambda: next(lines), out=out, max_new_tokens=NEW, temperature=0.0)
    assert "(conversation cleared)" in out.getvalue()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert messages[4]["content"] == _hf_reply(hf, hf_tok, messages[:4])  # the 2nd turn sees the 1st reply


def test_interactive_chat_ends_at_eof_on_a_new_line(ckpt):
    path, _, _ = ckpt

    def read():
        raise EOFError

    out = io.StringIO()
    assert chat_loop(from_pretrained(path), load_tokenizer(path), stop_ids=[], read=read, out=out) == []
    assert out.getvalue() == "> \n"


def test_ctrl_c_in_a_non_interactive_chat_ends_the_line_and_goes_on(ckpt):
    path, _, _ = ckpt

    class Out(io.StringIO):
        pieces = 0

        def write(self, text):
            if self.getvalue().startswith("> Hi\n"):  # a piece of the reply
                self.pieces += 1
                if self.pieces == 2:  # Ctrl-C while the reply is being shown
                    raise KeyboardInterrupt
            return super().write(text)

    out = Out()
    with pytest.raises(KeyboardInterrupt):
        chat_loop(from_pretrained(path), load_tokenizer(path), stop_ids=[], prompts=["Hi"], out=out,
                  max_new_tokens=8, temperature=0.0)
    assert out.getvalue().startswith("> Hi\n") and out.getvalue().endswith("\n")
    assert len(out.getvalue()) > len("> Hi\n\n")  # a piece was shown before the interruption


def test_interactive_chat_survives_a_full_context(ckpt):
    path, _, _ = ckpt
    model, tok = from_pretrained(path), load_tokenizer(path)
    lines = iter(["Hi", "word " * 400, "Bye", "/exit"])  # the 2nd turn alone is over the 256-token context
    out = io.StringIO()
    messages = chat_loop(model, tok, stop_ids=stop_token_ids(model, tok), read=lambda: next(lines),
                         out=out, max_new_tokens=4, temperature=0.0)
    assert "the model's context is 256; /reset to start over" in out.getvalue()
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Hi", "Bye"]
    with pytest.raises(ValueError, match="/reset to start over"):  # non-interactive turns: an error
        chat_loop(model, tok, stop_ids=[], prompts=["word " * 400], out=io.StringIO(), max_new_tokens=4)


@pytest.mark.parametrize("shown_pieces", [0, 2])
def test_ctrl_c_stops_one_interactive_reply(ckpt, shown_pieces):
    path, _, _ = ckpt
    model, tok = from_pretrained(path), load_tokenizer(path)
    lines = iter(["Hi", "Hello", "/exit"])
    turns = []
    pieces = []

    class Out(io.StringIO):
        def write(self, text):
            if len(turns) == 1 and text not in ("> ", "\n> "):  # a piece of the first reply
                if len(pieces) == shown_pieces:
                    turns.append("interrupted")
                    raise KeyboardInterrupt
                pieces.append(text)
            return super().write(text)

    def read():
        turns.append("read")
        return next(lines)

    out = Out()
    messages = chat_loop(model, tok, stop_ids=stop_token_ids(model, tok), read=read, out=out,
                         max_new_tokens=4, temperature=0.0)
    if shown_pieces == 0:  # nothing shown: the turn is dropped
        assert "(reply interrupted)" in out.getvalue()
        assert [m["content"] for m in messages if m["role"] == "user"] == ["Hello"]
    else:  # the shown part of the reply stays, as on screen
        assert "(reply interrupted; its text so far is kept)" in out.getvalue()
        assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
        assert messages[0] == {"role": "user", "content": "Hi"}
        assert messages[1] == {"role": "assistant", "content": "".join(pieces)}


def test_plain_generate_and_convert_cli(ckpt, tmp_path, capsys):
    path, hf, hf_tok = ckpt
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--temperature", "0",
                 "--max-new-tokens", "5"]) == 0
    ids = torch.tensor([hf_tok.encode("Hello")])
    new = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                      pad_token_id=0, eos_token_id=hf_tok.eos_token_id)[0, ids.shape[1]:]
    assert capsys.readouterr().out == "Hello" + hf_tok.decode(new, skip_special_tokens=True) + "\n"
    assert main(["convert", str(path), str(tmp_path / "m"), "--to", "mistral"]) == 0
    assert (tmp_path / "m" / "params.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "h"), "--max-shard-size", "40KB"]) == 0
    assert (tmp_path / "h" / "model.safetensors.index.json").is_file()
    assert main(["generate", "--prompt", "x"]) == 2
    assert "needs RUN_DIR and --prompt (or --model PATH" in capsys.readouterr().err
    assert main(["info", str(path)]) == 0  # the config only
    assert f"parameters: total {sum(p.numel() for p in hf.parameters()):,}" in capsys.readouterr().out


def test_generate_cli_usage_errors_come_before_any_prompt(ckpt, tmp_path, capsys):
    import json
    import shutil

    path, _, _ = ckpt
    bare = tmp_path / "no-template"
    shutil.copytree(path, bare)
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(bare), "--chat", "--prompt", "Hi"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "no chat template" in captured.err
    assert main(["generate", str(tmp_path), "--model", str(path), "--prompt", "Hi"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["generate", "--model", str(path), "--prompt", "Hi", "--system", "be brief"]) == 2
    assert "--system applies to --chat" in capsys.readouterr().err  # it was ignored
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for Latin-1 bytes
    for argv in (["--prompt", latin1], ["--prompt", "Hi", "--stop", latin1]):
        assert main(["generate", "--model", str(path), *argv]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and "is not valid UTF-8 text" in captured.err
