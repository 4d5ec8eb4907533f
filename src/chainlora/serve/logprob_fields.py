"""OpenAI's `logprobs` fields, built from the engine's per-token entries (inference/logprobs.py).

Two shapes, both OpenAI's:
- completions (legacy): `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`, one item
  per token; with `echo` the prompt's tokens come first (the first has no logprob: null). Each
  `top_logprobs` item is a dict of token text -> logprob holding the `logprobs` most likely tokens
  and the chosen one (as vLLM does); lm-evaluation-harness reads exactly these. `text_offset`
  is each token's offset in the concatenation of the tokens' texts. The end-of-answer token,
  when one ended the answer, is the last item (it was generated; `max_tokens: 1` always gives
  one item).
- chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
  "bytes"}]}], "refusal": null}`, one item per token of the message (no end-of-answer token).

A token's text is its own decoding; a token holding part of a multi-byte character reads
`bytes:\\xe2\\x80` (OpenAI's convention), and `bytes` gives its exact bytes.
"""

from __future__ import annotations

from typing import Any, Sequence

from chainlora.inference.answers import Answer
from chainlora.inference.logprobs import TokenLogprob
from chainlora.inference.stops import end_ids

FLOOR = -9999.0  # a probability of 0 (-inf is not JSON): OpenAI's own floor


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character that stands for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


class Vocab:
    """Token texts and bytes for one tokenizer, each computed once."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"
        self.table = _bytes_to_unicode() if self.byte_level else {}
        self.ends = end_ids(tokenizer)
        self._text: dict[int, str] = {}
        self._bytes: dict[int, bytes] = {}

    def bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            raw = self.tok.convert_ids_to_tokens(token)
            if self.byte_level and raw and all(c in self.table for c in raw) and token not in self.ends:
                self._bytes[token] = bytes(self.table[c] for c in raw)
            else:
                self._bytes[token] = self.tok.decode([token]).encode("utf-8", "replace")
        return self._bytes[token]

    def text(self, token: int) -> str:
        if token not in self._text:
            raw = self.bytes(token)
            try:
                self._text[token] = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a character
                self._text[token] = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self._text[token]


def _lp(value: float) -> float:
    return value if value > FLOOR else FLOOR


def _top_dict(vocab: Vocab, e: TokenLogprob, k: int) -> dict[str, float]:
    """The k most likely tokens and the chosen one, text -> logprob (a text two tokens share keeps the higher)."""
    out: dict[str, float] = {}
    for token, lp in [*e.top[:k], (e.token, e.logprob)]:
        text = vocab.text(token)
        out[text] = max(out.get(text, FLOOR), _lp(lp))
    return out


def completion(vocab: Vocab, entries: Sequence[TokenLogprob], k: int,
               prompt: tuple[list[int], list[TokenLogprob | None]] | None = None) -> dict:
    """A completion's `logprobs` for these entries, after the echoed prompt's (ids, entries)."""
    items: list[tuple[int, TokenLogprob | None]] = list(zip(*prompt)) if prompt else []
    items += [(e.token, e) for e in entries]
    tokens, offsets, at = [], [], 0
    for token, _ in items:
        tokens.append(vocab.text(token))
        offsets.append(at)
        at += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [None if e is None else _lp(e.logprob) for _, e in items],
            "top_logprobs": [None if e is None else _top_dict(vocab, e, k) for _, e in items],
            "text_offset": offsets}


def _chat_item(vocab: Vocab, token: int, lp: float) -> dict:
    return {"token": vocab.text(token), "logprob": _lp(lp), "bytes": list(vocab.bytes(token))}


def chat_content(vocab: Vocab, entries: Sequence[TokenLogprob], k: int) -> list[dict]:
    """Chat's `logprobs.content` items for these entries (end-of-answer tokens left out)."""
    return [{**_chat_item(vocab, e.token, e.logprob), "top_logprobs": [_chat_item(vocab, t, lp) for t, lp in e.top[:k]]}
            for e in entries if e.token not in vocab.ends]


def chat(vocab: Vocab, a: Answer, k: int) -> dict:
    return {"content": chat_content(vocab, a.logprobs or [], k), "refusal": None}
