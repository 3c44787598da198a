"""Tokenizer of an HF checkpoint directory and its chat template, rendered as transformers renders it.

``load_tokenizer(path)`` reads ``tokenizer.json`` (the HF ``tokenizers`` fast-tokenizer file),
``tokenizer_config.json`` (special tokens, chat template) and ``chat_template.jinja`` /
``additional_chat_templates/*.jinja`` (transformers >= 4.50 writes templates there). The chat template
is compiled in jinja2's immutable sandbox with the options, filters and globals transformers uses
(``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, a ``{% generation %}`` tag, ``raise_exception``,
``strftime_now``, a non-escaping ``tojson``, ``dict``, a guarded ``namespace``) and rendered with
``messages``, ``tools``, ``documents``, ``add_generation_prompt`` and the named special tokens
(``bos_token``, ``eos_token``, ...), so ``apply_chat_template`` gives the same string.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from moekit.hf.checkpoint import read_json_object

SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"
)
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TokenizerNotFoundError(FileNotFoundError):
    """The checkpoint directory has no ``tokenizer.json``."""


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (marks assistant text for masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` for templates without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2 ``namespace`` that refuses underscore-prefixed attributes (as transformers does)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same signature trick as jinja2's
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set namespace attribute {name!r}")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes; chat templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the sandbox with transformers' options, filters and globals."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _clean_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop ``None`` values and alias reasoning fields, as transformers does before rendering."""
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with the checkpoint's special tokens and chat template.

    Attributes:
        tokenizer: the fast tokenizer (what ``moekit.inference.generate_text`` takes).
        special_tokens: named special tokens, e.g. ``{"bos_token": "<s>", "eos_token": "</s>"}``.
        chat_template: the template source, a ``{name: source}`` dict, or None.
    """

    tokenizer: Tokenizer
    special_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | dict[str, str] | None = None

    @property
    def eos_token_id(self) -> int | None:
        eos = self.special_tokens.get("eos_token")
        return None if eos is None else self.tokenizer.token_to_id(eos)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_chat_template(self, name: str | None = None, tools: list | None = None) -> str:
        """The template source (``name`` picks one of several; ``tool_use`` is preferred with tools)."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if name is None:
                name = "tool_use" if tools is not None and "tool_use" in templates else "default"
            if name not in templates:
                raise ValueError(f"chat template {name!r} not found; this tokenizer has {sorted(templates)}")
            return templates[name]
        if templates is None:
            raise ValueError(
                "this tokenizer has no chat template (tokenizer_config.json / chat_template.jinja)"
            )
        if name is not None:
            raise ValueError(f"this tokenizer has a single chat template, not a set to pick {name!r} from")
        return templates

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render a conversation (``[{"role": ..., "content": ...}, ...]``) with the chat template.

        ``chat_template`` is a template name (of several) or None. Extra ``kwargs`` are visible to the
        template and override the special tokens, as in transformers. With ``tokenize`` the rendered
        text is encoded without adding special tokens (the template writes them).
        ``continue_final_message``: the text ends with the last message's content (no end-of-turn
        after it), so a model continues that message, as transformers does. ``tools`` are JSON-schema
        dicts (transformers also turns Python functions into them; moekit does not).
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt exclude each other")
        if tools is not None and any(callable(t) for t in tools):
            raise TypeError("tools must be JSON-schema dicts ({'type': 'function', 'function': {...}}), "
                            "not Python functions")
        template = compile_chat_template(self.get_chat_template(chat_template, tools))
        messages = _clean_messages(list(messages))
        if continue_final_message:  # mark where the final message ends, render, cut there
            messages[-1] = _with_end_marker(messages[-1])
        text = template.render(
            messages=messages,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens, **kwargs},
        )
        if continue_final_message:
            at = text.rfind(_END_MARKER.strip())
            if at < 0:
                raise ValueError("continue_final_message: the final message does not appear in the rendered "
                                 "chat (the template changes it)")
            # The marker's trailing space survives unless the template strips the message: then
            # the message's own trailing whitespace is gone too.
            kept = text[at : at + len(_END_MARKER)] == _END_MARKER
            text = text[:at] if kept else text[:at].rstrip()
        return self.encode(text, add_special_tokens=False) if tokenize else text


_END_MARKER = "MOEKIT_END_OF_FINAL_MESSAGE "


def _with_end_marker(message: dict) -> dict:
    """``message`` with ``_END_MARKER`` after its content (the last text part of a list content)."""
    content = message.get("content")
    if isinstance(content, (list, tuple)):
        parts = list(content)
        last = max((i for i, p in enumerate(parts) if isinstance(p, dict) and "text" in p), default=None)
        if last is None:
            raise ValueError("continue_final_message: the final message has no text to continue")
        parts[last] = {**parts[last], "text": parts[last]["text"] + _END_MARKER}
        return {**message, "content": parts}
    return {**message, "content": (content or "") + _END_MARKER}


def _add_missing_tokens(tokenizer: Tokenizer, added: dict[str, Any]) -> None:
    """Add the ``added_tokens_decoder`` entries of ``tokenizer_config.json`` that ``tokenizer.json``
    lacks (transformers adds them too), in id order; a warning when one does not land on its id."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab(with_added_tokens=True)
    for index, entry in sorted(((int(i), e) for i, e in added.items()), key=lambda item: item[0]):
        content = _token_content(entry)
        if content is None or content in vocab:
            continue
        options = {k: bool(entry[k]) for k in ("single_word", "lstrip", "rstrip", "normalized")
                   if isinstance(entry, dict) and k in entry}
        token = AddedToken(content, special=isinstance(entry, dict) and bool(entry.get("special")), **options)
        (tokenizer.add_special_tokens if token.special else tokenizer.add_tokens)([token])
        got = tokenizer.token_to_id(content)
        if got != index:
            warnings.warn(f"tokenizer_config.json: added token {content!r} should have id {index}; "
                          f"tokenizer.json's vocabulary gives it {got}", UserWarning, stacklevel=3)


def load_tokenizer(path: str | Path) -> HFTokenizer:
    """Load the tokenizer of a checkpoint directory (or hub id in the local cache)."""
    from moekit.hf.resolve import resolve_path

    root = resolve_path(path)
    tok_file = root / "tokenizer.json"
    if not tok_file.is_file():
        hint = ""
        if any((root / n).exists() for n in ("tokenizer.model", "tekken.json", "tokenizer.model.v3")):
            hint = (" (a sentencepiece / Mistral tokenizer file is there; write tokenizer.json once with "
                    "`transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR)`)")
        raise TokenizerNotFoundError(f"{tok_file}: missing tokenizer file{hint}")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # tokenizers raises a bare Exception on bad files
        raise ValueError(f"{tok_file}: cannot load tokenizer ({e})") from e
    config_file = root / "tokenizer_config.json"
    config = read_json_object(config_file) if config_file.is_file() else {}
    added = config.get("added_tokens_decoder")
    if isinstance(added, dict):
        _add_missing_tokens(tokenizer, added)
    elif (root / "special_tokens_map.json").is_file():
        # As transformers: the legacy special_tokens_map.json is read only when tokenizer_config.json
        # has no added_tokens_decoder, and then its entries win.
        config.update(read_json_object(root / "special_tokens_map.json"))
    special = {k: c for k in SPECIAL_TOKEN_KEYS if (c := _token_content(config.get(k))) is not None}
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates.update({t["name"]: t["template"] for t in raw})
    if (root / "chat_template.jinja").is_file():
        templates["default"] = (root / "chat_template.jinja").read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        templates.update({p.stem: p.read_text(encoding="utf-8") for p in sorted(extra_dir.glob("*.jinja"))})
    chat: str | dict[str, str] | None = None
    if list(templates) == ["default"]:
        chat = templates["default"]
    elif templates:
        chat = templates
    return HFTokenizer(tokenizer=tokenizer, special_tokens=special, chat_template=chat)
