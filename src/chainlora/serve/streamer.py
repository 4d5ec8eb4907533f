"""A batch's streamed text: one transformers streamer sees every row of a generate call and
hands each streaming request its new text (and, when it asked, the logprob entries of the
tokens that text completes) as it grows. What is sent is always a prefix of the final answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from chainlora.inference.engine import Answer
from chainlora.inference.logprobs import Recorder
from chainlora.inference.stops import end_ids, streamable

if TYPE_CHECKING:
    from chainlora.serve.scheduler import Request


class BatchStreamer:
    """A transformers streamer for a whole batch: decodes each row as it grows and hands its
    new text to the row's request. Text that might still turn into a stop string, or trailing
    whitespace, is held back until it is safe; the answer's final text settles the rest. With
    a `recorder` (logprobs asked), each piece of text comes with the entries of the tokens it
    completes (`on_text(text, entries, tokens so far)`), so a client that joins them gets the answer's own."""

    def __init__(self, tokenizer: Any, requests: list[Request], recorder: Recorder | None = None):
        self.tok, self.requests, self.recorder = tokenizer, requests, recorder
        self.ids: list[list[int]] = [[] for _ in requests]
        self.lengths: list[list[int]] = [[] for _ in requests]  # decoded length after each token
        self.sent = ["" for _ in requests]
        self.given = [0 for _ in requests]  # logprob entries sent
        self.closed = [r.on_text is None for r in requests]
        self.prompt_seen = False
        self.ends = end_ids(tokenizer)
        self.rows = list(range(len(requests)))  # the rows still in the call (a chunked prefill drops some)

    def select(self, rows: list[int]) -> None:
        self.rows = list(rows)

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        tokens = value.reshape(len(self.rows), -1)[:, -1]
        if self.recorder is not None:
            self.recorder.commit(tokens)  # before the text goes out, so its entries go with it
        for i, token in zip(self.rows, tokens.tolist()):
            if self.closed[i]:
                continue
            if token in self.ends or len(self.ids[i]) >= self.requests[i].max_tokens:
                self.closed[i] = True
                continue
            self.ids[i].append(token)
            self._emit(i)

    def _emit(self, i: int) -> None:
        decoded = self.tok.decode(self.ids[i], skip_special_tokens=True)
        self.lengths[i].append(len(decoded))
        text = streamable(decoded, self.requests[i].stop)
        if len(text) > len(self.sent[i]) and text.startswith(self.sent[i]):
            lead = len(decoded) - len(decoded.lstrip())  # the answer is stripped
            done = sum(1 for n in self.lengths[i] if n <= lead + len(text))  # tokens wholly sent
            self.requests[i].on_text(text[len(self.sent[i]):], self._entries(i, done), len(self.ids[i]))
            self.sent[i] = text

    def _entries(self, i: int, upto: int | None) -> list:
        """Row i's logprob entries not yet sent, up to token `upto` (None: all)."""
        if self.recorder is None or i not in self.recorder.want:
            return []
        found = self.recorder.found[i]
        upto = len(found) if upto is None else min(upto, len(found))
        out, self.given[i] = found[self.given[i]:upto], max(self.given[i], upto)
        return out

    def finish(self, i: int, answer: Answer) -> None:
        """Send what the answer adds to what was streamed (its text is the authority), with the
        rest of its logprob entries."""
        req = self.requests[i]
        if req.on_text is None:
            return
        rest = answer.text[len(self.sent[i]):] if answer.text.startswith(self.sent[i]) else ""
        entries = (answer.logprobs or [])[self.given[i]:]
        if rest or entries:
            req.on_text(rest, entries, answer.completion_tokens)

    def end(self) -> None:
        pass
