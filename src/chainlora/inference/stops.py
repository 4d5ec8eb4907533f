"""Where an answer ends: the end-of-answer tokens and stop strings, in one place.

The engine cuts a finished answer with these; the server's streamer uses the same rules while
the answer is still growing, so what is streamed is always a prefix of the final text.
"""

from __future__ import annotations

from typing import Any, Sequence


def end_ids(tokenizer: Any) -> set[int]:
    """Token ids that end an answer: end-of-sequence, and padding (a finished row in a batch)."""
    return {t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string, and whether one was found."""
    found = [text.index(s) for s in stops if s and s in text]
    return (text[: min(found)], True) if found else (text, False)


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
