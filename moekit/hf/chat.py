"""``moekit generate --model PATH [--chat]``: text and chat generation from a checkpoint directory.

Chat renders the whole conversation with the tokenizer's chat template (``add_generation_prompt``),
encodes it without extra special tokens (the template writes them), streams the reply until an
end-of-sequence token (tokenizer ``eos_token``, config / ``generation_config.json`` ``eos_token_id``)
or a stop string, and appends it to the conversation. Interactive mode reads one user turn per line;
``/reset`` clears the conversation, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any, TextIO

from moekit.hf.config_map import MODEL_TYPES
from moekit.hf.load import from_pretrained
from moekit.hf.resolve import resolve_path
from moekit.hf.tokenizer import HFTokenizer, load_tokenizer
from moekit.models import MoEForCausalLM


def stop_token_ids(model: MoEForCausalLM, tokenizer: HFTokenizer) -> list[int]:
    """Every end-of-sequence id the checkpoint names (config, generation_config.json, tokenizer)."""
    from moekit.inference.generate import default_stop_ids

    ids = [*default_stop_ids(model), tokenizer.eos_token_id]
    return sorted({i for i in ids if i is not None and 0 <= i < model.config.vocab_size})


class ContextFullError(ValueError):
    """The conversation's tokens fill the model's context: no room for a reply."""


def reply(
    model: MoEForCausalLM,
    tokenizer: HFTokenizer,
    messages: list[dict[str, Any]],
    *,
    stop_ids: list[int],
    stream: Callable[[str], None] | None = None,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    template_vars: dict[str, Any] | None = None,
    **sampling: Any,
) -> str:
    """Generate the assistant's next message for ``messages``; returns its text. ``template_vars`` are
    extra variables of the chat template (e.g. ``{"enable_thinking": False}`` for Qwen3)."""
    from moekit.inference import generate
    from moekit.inference.text import _RowText, special_stop_ids  # what generate_text uses

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **(template_vars or {}))
    assert isinstance(ids, list)
    room = model.config.max_position_embeddings - len(ids) + 1  # the last new token is not fed back
    if room < 1:
        raise ContextFullError(
            f"the conversation has {len(ids)} tokens, the model's context is "
            f"{model.config.max_position_embeddings}; /reset to start over"
        )
    row = _RowText(tokenizer.tokenizer, stop or [])

    def on_token(_: int, token_id: int) -> bool:
        piece = row.push(token_id)
        if piece and stream is not None:
            stream(piece)
        return row.stopped

    stop_ids = [*stop_ids, *special_stop_ids(tokenizer.tokenizer, stop or [])]
    generate(model, [ids], min(max_new_tokens, room), stop_token_ids=stop_ids, on_token=on_token, **sampling)
    piece = row.flush()
    if piece and stream is not None:
        stream(piece)
    return row.text


def chat_loop(
    model: MoEForCausalLM,
    tokenizer: HFTokenizer,
    *,
    stop_ids: list[int],
    system: str | None = None,
    prompts: list[str] | None = None,
    read: Callable[[], str] | None = None,
    out: TextIO | None = None,
    **gen: Any,
) -> list[dict[str, Any]]:
    """Multi-turn chat. Turns come from ``prompts`` (one each) or, when None, from ``read()`` until
    ``/exit`` or EOF; output goes to ``out`` (default stdout). Returns the conversation."""
    out = out or sys.stdout
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    interactive = prompts is None
    turns = iter(prompts or [])

    def next_turn() -> str | None:
        if not interactive:
            return next(turns, None)
        try:
            out.write("\n> " if messages else "> ")
            out.flush()
            return (read or input)()
        except EOFError:  # Ctrl-D: the shell's prompt goes on a line of its own
            out.write("\n")
            return None

    shown: list[str] = []  # what the terminal shows of the reply being generated

    def stream(piece: str) -> None:
        out.write(piece)
        out.flush()
        shown.append(piece)

    while (text := next_turn()) is not None:
        if text.strip() == "/exit":
            break
        if text.strip() == "/reset":
            messages = messages[:1] if system else []
            out.write("(conversation cleared)\n")
            continue
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        if not interactive:
            out.write(f"> {text}\n")
        shown.clear()
        try:
            answer = reply(model, tokenizer, messages, stop_ids=stop_ids, stream=stream, **gen)
        except ContextFullError as error:
            if not interactive:
                raise
            messages.pop()  # the turn that did not fit; the conversation so far is kept
            out.write(f"({error})\n")
            continue
        except KeyboardInterrupt:
            if not interactive:
                if shown:  # the reply so far stays on screen, its line ended
                    out.write("\n")
                raise
            # Ctrl-C stops this reply only (Ctrl-C at the prompt, or /exit, quits). What was shown of
            # it stays in the conversation, as on screen; a reply stopped before its first piece
            # takes its user turn with it.
            if "".join(shown).strip():
                messages.append({"role": "assistant", "content": "".join(shown)})
                out.write("\n(reply interrupted; its text so far is kept)\n")
            else:
                messages.pop()
                out.write("\n(reply interrupted)\n")
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": answer})
    return messages


def add_generate_flags(p: argparse.ArgumentParser) -> None:
    """The checkpoint flags of ``moekit generate`` (``--model``, ``--chat``, ``--system``, ``--dtype``)."""
    p.add_argument("--model", default=None, metavar="PATH",
                   help="an HF / Mistral checkpoint directory (or a cached hub id) instead of a run")
    p.add_argument("--chat", action="store_true",
                   help="apply the tokenizer's chat template; without --prompt: interactive multi-turn chat")
    p.add_argument("--system", default=None, help="system message for --chat")
    p.add_argument("--template-var", action="append", default=[], metavar="KEY=VALUE",
                   help="a variable of the chat template, e.g. enable_thinking=false (Qwen3); VALUE is "
                        "read as JSON when it parses, else as text (repeatable)")
    p.add_argument("--dtype", default=None,
                   help="dtype of --model weights, e.g. bfloat16; None = the checkpoint's")


_RESERVED_VARS = ("messages", "add_generation_prompt", "tokenize", "chat_template", "tools", "documents")


def template_vars(items: list[str]) -> dict[str, Any]:
    """``--template-var KEY=VALUE`` items -> ``{KEY: VALUE}``, VALUE parsed as JSON when it parses."""
    from moekit.cli import parse_key_values

    out = parse_key_values(items, "--template-var", "with KEY a name", key_ok=str.isidentifier)
    for key in out:
        if key in _RESERVED_VARS:
            raise ValueError(f"--template-var {key}: set by moekit itself; choose another variable")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    """``moekit generate --model PATH``: prompts, or ``--chat`` (a turn per --prompt, or interactive)."""
    variables = template_vars(args.template_var)  # checked before the model is loaded
    if args.template_var and not args.chat:
        raise ValueError("--template-var applies to --chat (the chat template)")
    if args.system is not None and not args.chat:
        raise ValueError("--system applies to --chat (a system message of the conversation)")
    if not args.chat and not args.prompt:
        raise ValueError("--prompt is required without --chat")
    root = resolve_path(args.model)
    model = from_pretrained(root, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(root)
    if args.chat:
        tokenizer.get_chat_template()  # no template: say so before the first prompt
    stop_ids = stop_token_ids(model, tokenizer)
    sampling = {
        "temperature": args.temperature,
        "top_k": args.top_k or None,
        "top_p": args.top_p if args.top_p < 1 else None,
        "seed": args.seed,
    }
    if args.chat:
        chat_loop(model, tokenizer, stop_ids=stop_ids, system=args.system, prompts=args.prompt,
                  max_new_tokens=args.max_new_tokens, stop=args.stop, template_vars=variables, **sampling)
        return 0
    from moekit.cli import print_generations

    print_generations(model, tokenizer.tokenizer, args.prompt, no_stream=args.no_stream,
                      max_new_tokens=args.max_new_tokens, stop=args.stop, stop_token_ids=stop_ids, **sampling)
    return 0


def add_convert_parser(sub: Any) -> None:
    """``moekit convert SRC DST --to hf|mistral``."""
    p = sub.add_parser("convert", help="convert a checkpoint between HF and Mistral layouts (safetensors)")
    p.add_argument("src", help="checkpoint directory (HF config.json / Mistral params.json) or cached hub id")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", choices=("hf", "mistral"), default="hf", help="output layout (default: hf)")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB (hf default) or 500MB")
    p.add_argument("--dtype", default=None, help="cast weights, e.g. bfloat16 (default: keep)")
    p.add_argument("--model-type", default=None, choices=MODEL_TYPES,
                   help="HF model_type to write (default: the one matching the config)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from moekit.hf.save import convert

    out = convert(args.src, args.dst, to=args.to, max_shard_size=args.max_shard_size, dtype=args.dtype,
                  model_type=args.model_type)
    print(f"wrote {args.to} checkpoint to {out}")
    return 0
