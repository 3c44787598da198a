"""Text in, text out: tokenize prompts, generate, stream decoded text, cut at stop strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from moekit.inference.generate import default_stop_ids, generate
from moekit.models.model import MoEForCausalLM

StreamCallback = Callable[[int, str], None]


class _RowText:
    """Incremental detokenisation of one row, holding back text that could still become a stop string.

    ``context``: token ids decoded in front of the row's (the end of its prompt) and cut off again, so
    that decoders which strip a leading space (Llama / Mistral's Metaspace) keep the space between the
    prompt and the first new token, as transformers' ``decode(prompt + new)`` does.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], context: Sequence[int] = ()) -> None:
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.context = list(context)
        self.context_text = tokenizer.decode(self.context, skip_special_tokens=True) if self.context else ""
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        if self.context:
            text = self.tokenizer.decode(self.context + self.ids, skip_special_tokens=True)
            if text.startswith(self.context_text):
                return text[len(self.context_text) :]
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add a token; return the newly safe text. Sets ``stopped`` when a stop string appears."""
        self.ids.append(token_id)
        self.text = self._decode()
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        # An incomplete UTF-8 character decodes to U+FFFD, one per byte with byte-fallback
        # tokenizers: hold them all back until the character is complete.
        # The hold-back for stop strings counts from the complete text: a pending character's U+FFFD
        # must not stand in for the end of a stop string that the character completes.
        safe = len(self.text.rstrip("\ufffd")) - self.hold
        if safe <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : safe], safe
        return piece

    def flush(self) -> str:
        piece, self.emitted = self.text[self.emitted :], len(self.text)
        return piece


def _prompt_context(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """The end of a prompt from its last token that decodes to text: special tokens (Mistral's
    ``[/INST]``) are skipped in decoding, so ``decode(prompt + new)`` keeps the space of the first
    new token after the last ordinary token before them."""
    special = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    last = next((j for j in range(len(ids) - 1, -1, -1) if ids[j] not in special), len(ids) - 1)
    return list(ids[last:])


def special_stop_ids(tokenizer: Any, stop: Sequence[str]) -> list[int]:
    """Ids of the stop strings that are special tokens (ChatML's ``"<|im_end|>"``): the text is
    decoded without special tokens, so these must stop at their id."""
    special = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    return [special[s] for s in stop if s in special]


def generate_text(
    model: MoEForCausalLM,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_new_tokens: int = 128,
    *,
    stop: Sequence[str] | None = None,
    stream: StreamCallback | None = None,
    **kwargs: Any,
) -> list[str]:
    """Generate a continuation of each prompt with a ``tokenizers.Tokenizer`` (or the
    :class:`moekit.hf.HFTokenizer` of a checkpoint).

    Args:
        prompts: one string or a list of strings (a batch).
        stop: stop strings; a row ends at the first one (which is not included in its text). A
            special token's text (e.g. ``"<|im_end|>"``) stops at that token.
        stream: ``stream(row, text_piece)`` called with new text as soon as it is final.
        **kwargs: passed to :func:`moekit.inference.generate` (temperature, top_k, top_p, seed,
            stop_token_ids, compile).

    Returns:
        The generated text of each prompt (prompt not included): ``prompt + text`` reads as the
        decoded whole, the space after the prompt included.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a string or a non-empty list of strings")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
    from moekit.hf.tokenizer import HFTokenizer

    if isinstance(tokenizer, HFTokenizer):  # what moekit.load_tokenizer returns
        tokenizer = tokenizer.tokenizer
    prompt_ids = [tokenizer.encode(p).ids for p in prompts]
    for b, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {b} encodes to no tokens")
    extra = special_stop_ids(tokenizer, stop)
    if extra:
        given = kwargs.get("stop_token_ids")
        kwargs["stop_token_ids"] = [*(default_stop_ids(model) if given is None else given), *extra]
    rows = [_RowText(tokenizer, stop, context=_prompt_context(tokenizer, ids)) for ids in prompt_ids]

    def on_token(row: int, token_id: int) -> bool:
        piece = rows[row].push(token_id)
        if piece and stream is not None:
            stream(row, piece)
        return rows[row].stopped

    generate(model, prompt_ids, max_new_tokens, on_token=on_token, **kwargs)
    for b, r in enumerate(rows):
        piece = r.flush()
        if piece and stream is not None:
            stream(b, piece)
    return [r.text for r in rows]
