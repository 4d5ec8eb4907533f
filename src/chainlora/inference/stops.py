"""Where an answer ends: the end-of-answer tokens and stop strings, in one place.

The engine cuts a finished answer with these; the server's streamer uses the same rules while
the answer is still growing, so what is streamed is always a prefix of the final text.

`StopMatcher` ends a row of `generate` at its stop string. transformers' own StopStringCriteria
precomputes tables that grow with each string's length and caches them per string for the
life of the process (a 100 KB stop string from one request took 23 GB); this one decodes only
the tail of each row that a stop string could span, so its cost is bounded by the strings'
length and the batch, and nothing outlives the call.
"""

from __future__ import annotations

from typing import Any, Sequence

BYTES_PER_CHAR = 4  # UTF-8: a byte-level token carries at least one byte, a character at most 4


def end_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an answer: end-of-sequence, and padding (a finished row in a batch)."""
    return {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    found = [text.index(s) for s in stops if s and s in text]
    return (text[: min(found)], True) if found else (text, False)


def stop_tokens(tokenizer: Any, ids: Sequence[int], stops: Sequence[str]) -> int:
    """How many of `ids` it took for their text to hold a stop string: the answer's tokens (a
    binary search, as the text only grows with the tokens)."""
    lo, hi = 1, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if cut_at_stop(tokenizer.decode(list(ids[:mid]), skip_special_tokens=True), stops)[1]:
            hi = mid
        else:
            lo = mid + 1
    return hi


def streamable(text: str, stops: Sequence[str]) -> str:
    """The part of a growing answer that is safe to send: up to a complete stop string, less a
    tail that might still become one, less half a multi-byte character, less trailing space
    (the final answer is stripped)."""
    text, stopped = cut_at_stop(text, stops)
    if not stopped:
        hold = max((len(s) for s in stops), default=1) - 1
        text = text[: len(text) - hold] if hold else text
    if "\ufffd" in text:  # half a multi-byte character: wait for the rest
        text = text[: text.index("\ufffd")]
    return text.strip()


class StopMatcher:
    """A StoppingCriteria: per row, True once its answer's decoded text holds a stop string.
    Only the last 4 x (longest stop) + 1 tokens are decoded: a stop string of n characters
    is made of at most 4n byte-level tokens, plus one that may carry a character's tail."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.window = BYTES_PER_CHAR * max((len(s) for s in self.stops), default=0) + 1
        self.start: int | None = None  # the padded prompt's width, seen at the first check

    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
        import torch

        if self.start is None:
            self.start = input_ids.shape[1] - 1  # called after each new token
        tail = input_ids[:, max(self.start, input_ids.shape[1] - self.window):]
        texts = self.tok.batch_decode(tail, skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in texts], dtype=torch.bool,
                            device=input_ids.device)


class EndSuppressor:
    """A logits processor for rows with a minimum length: vLLM's `min_tokens`, and `ignore_eos`
    (vLLM's and llama-server's; its minimum is the row's max_tokens, so it runs to it, as a load
    benchmark's fixed output lengths need). Until a row has made its minimum, its end tokens can
    never be chosen (their logits at -inf, as llama-server does it); placed after the Recorder,
    so reported logprobs stay the model's own. Rows without a minimum are untouched."""

    def __init__(self, minimum: dict[int, int], ends: set[int]):
        self.want, self.ends = minimum, sorted(ends)  # want: batch row -> tokens it must make
        self.rows: list[int] = []  # the batch rows in the call (set by select; a chunked prefill drops some)
        self.start: int | None = None  # the padded prompt's width, seen at the first step

    def select(self, rows: Sequence[int]) -> None:
        self.rows = list(rows)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.start is None:
            self.start = input_ids.shape[1]
        made = input_ids.shape[1] - self.start
        at = [j for j, i in enumerate(self.rows) if self.want.get(i, 0) > made]
        if not at or not self.ends:
            return scores
        scores = scores.clone()
        rows = torch.tensor(at, device=scores.device)[:, None]
        scores[rows, torch.tensor(self.ends, device=scores.device)] = float("-inf")
        return scores
