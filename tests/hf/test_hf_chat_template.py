"""A tiny tokenizer with chat templates renders exactly as transformers' apply_chat_template."""

import jinja2
import pytest

from moekit.hf import TokenizerNotFoundError, load_tokenizer

from .builders import tiny_tokenizer

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mixtral-instruct style: bos_token, role alternation enforced with raise_exception, whitespace control.
MIXTRAL = (
    "{{- bos_token }}\n{%- for message in messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n    {%- if message['role'] == 'user' %}\n"
    "        {{- ' [INST] ' + message['content'] | trim + ' [/INST]' }}\n"
    "    {%- elif message['role'] == 'assistant' %}\n        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- endif %}\n{%- endfor %}\n"
)
# Tools with tojson, namespace, dict(), loop controls and a {% generation %} block.
TOOLS = (
    "{%- set ns = namespace(n=0) -%}{%- if tools %}<tools>{{ tools | tojson }}</tools>\n{% endif -%}"
    "{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if m.role == 'stop' %}{% break %}{% endif %}"
    "<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
    "{% endgeneration %}"
    "{% else %}{{ m.content }}{% endif %}{% if m.reasoning_content %}<think>{{ m.reasoning_content }}</think>"
    "{% endif %}<|im_end|>\n{% endfor %}{{ dict(count=ns.n) | tojson }}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Reasoning models (Qwen3 style): str methods, reversed slices, `is defined` tests and a template kwarg.
THINKING = (
    "{%- set ns = namespace(last_user=-1) %}{%- for m in messages[::-1] %}"
    "{%- if ns.last_user < 0 and m.role == 'user' %}"
    "{%- set ns.last_user = messages|length - 1 - loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'assistant' and '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') %}"
    "{%- if loop.index0 > ns.last_user %}"
    "{{- '<|im_start|>assistant\n<think>\n' + reasoning + '\n</think>\n\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\n' }}{%- endif %}{{- content.rstrip() + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\n' + content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}"
    "{%- endif %}{%- endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "I am fine, thank you."}, {"role": "user", "content": "  Experts? "}],
]
TOOL_SPEC = [{"type": "function", "function": {"name": "get_weather", "description": "Wetter in Zürich <b>",
                                               "parameters": {"city": {"type": "string"}}}}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    templates = {"chatml": CHATML, "mixtral": MIXTRAL, "tools": TOOLS, "thinking": THINKING}
    for name, template in templates.items():
        path = tmp_path_factory.mktemp(name)
        hf_tok = transformers.PreTrainedTokenizerFast(
            tokenizer_object=tiny_tokenizer(), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
            chat_template=template,
        )
        hf_tok.save_pretrained(path)
        out[name] = (hf_tok, path)
    return out


@pytest.mark.parametrize("name", ["chatml", "mixtral", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_equals_transformers(saved, name, add_generation_prompt):
    hf_tok, path = saved[name]
    tok = load_tokenizer(path)
    assert tok.special_tokens["bos_token"] == "<s>" and tok.eos_token_id == hf_tok.eos_token_id
    for messages in CONVERSATIONS:
        if name == "mixtral" and messages[0]["role"] == "system":
            messages = messages[1:]
        for tools in ([None, TOOL_SPEC] if name == "tools" else [None]):
            kw = dict(add_generation_prompt=add_generation_prompt, tools=tools)
            expected = hf_tok.apply_chat_template(messages, tokenize=False, **kw)
            assert tok.apply_chat_template(messages, **kw) == expected
            ids = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False, **kw)
            assert tok.apply_chat_template(messages, tokenize=True, **kw) == list(ids)


def test_continue_final_message_like_transformers_and_tool_functions_refused(saved):
    hf_tok, path = saved["chatml"]
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "I am"}]
    expected = hf_tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert tok.apply_chat_template(messages, continue_final_message=True) == expected
    assert expected.endswith("assistant\nI am")
    with pytest.raises(ValueError, match="exclude each other"):
        tok.apply_chat_template(messages, continue_final_message=True, add_generation_prompt=True)
    with pytest.raises(TypeError, match="JSON-schema dicts"):
        tok.apply_chat_template(messages[:1], tools=[len])


@pytest.mark.parametrize("name", ["chatml", "mixtral"])
@pytest.mark.parametrize("final", ["<", "end", "Hello ", "", " spaced  ", "im_start"])
def test_continue_final_message_cuts_where_the_message_ends(saved, name, final):
    # Text that also occurs in what the template writes after the message (the end-of-turn token),
    # trailing spaces, an empty prefill; the mixtral template strips the content.
    hf_tok, path = saved[name]
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": final}]
    expected = hf_tok.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert tok.apply_chat_template(messages, continue_final_message=True) == expected


def test_none_values_reasoning_and_loop_controls_like_transformers(saved):
    hf_tok, path = saved["tools"]
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": "Hi", "tool_calls": None},
                {"role": "assistant", "content": "Hello", "reasoning_content": "greet"},
                {"role": "stop", "content": "x"}, {"role": "user", "content": "never rendered"}]
    expected = hf_tok.apply_chat_template(messages, tokenize=False)
    assert "never rendered" not in expected and "<think>greet</think>" in expected
    assert tok.apply_chat_template(messages) == expected


@pytest.mark.parametrize("enable_thinking", [None, True, False])
def test_reasoning_template_like_transformers(saved, enable_thinking):
    hf_tok, path = saved["thinking"]
    tok = load_tokenizer(path)
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4 "},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "<think>\nagain\n</think>\n\n6"}]
    for conversation in (messages, messages[:3]):
        kw = dict(add_generation_prompt=len(conversation) == 3)
        if enable_thinking is not None:
            kw["enable_thinking"] = enable_thinking
        expected = hf_tok.apply_chat_template(conversation, tokenize=False, **kw)
        assert tok.apply_chat_template(conversation, **kw) == expected
    assert "add them" not in expected  # an earlier turn's reasoning is dropped


def test_raise_exception_and_sandbox(saved):
    hf_tok, path = saved["mixtral"]
    tok = load_tokenizer(path)
    bad = [{"role": "assistant", "content": "first"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf_tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    tok.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_named_templates_and_missing_tokenizer(tmp_path):
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer(), eos_token="</s>",
        chat_template={"default": CHATML, "tool_use": TOOLS},
    )
    hf_tok.save_pretrained(tmp_path / "multi")
    tok = load_tokenizer(tmp_path / "multi")
    assert set(tok.chat_template) == {"default", "tool_use"}
    msgs = CONVERSATIONS[0]
    for kw in (dict(), dict(tools=TOOL_SPEC), dict(chat_template="tool_use")):
        assert tok.apply_chat_template(msgs, **kw) == hf_tok.apply_chat_template(msgs, tokenize=False, **kw)
    with pytest.raises(ValueError, match="'nope' not found"):
        tok.apply_chat_template(msgs, chat_template="nope")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "tokenizer.model").write_bytes(b"")
    with pytest.raises(TokenizerNotFoundError, match="tokenizer.json: missing tokenizer file.*sentencepiece"):
        load_tokenizer(tmp_path / "none")


def _write_tokenizer_dir(path, config, special_map=None):
    import json

    path.mkdir()
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return path


@pytest.mark.parametrize("modern", [False, True])
def test_special_tokens_map_precedence_like_transformers(tmp_path, modern):
    """Legacy directories: special_tokens_map.json wins; with added_tokens_decoder it is not read."""
    template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "chat_template": template}
    if modern:
        config["added_tokens_decoder"] = {"1": {"content": "<s>", "special": True}}
    path = _write_tokenizer_dir(tmp_path / "tok", config, {"bos_token": "<|im_start|>", "eos_token": "</s>"})
    theirs, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    messages = [{"role": "user", "content": "Hi"}]
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.eos_token_id == theirs.eos_token_id


def test_added_tokens_missing_from_tokenizer_json_are_added(tmp_path):
    vocab = tiny_tokenizer().get_vocab_size()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "chat_template": CHATML,
              "added_tokens_decoder": {str(vocab): {"content": "<think>", "special": False, "lstrip": False,
                                                    "rstrip": False, "normalized": False,
                                                    "single_word": False}}}
    path = _write_tokenizer_dir(tmp_path / "tok", config)
    theirs, ours = transformers.AutoTokenizer.from_pretrained(path), load_tokenizer(path)
    messages = [{"role": "user", "content": "<think>x"}]
    ids = ours.apply_chat_template(messages, tokenize=True)
    assert ids == list(theirs.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert vocab in ids
