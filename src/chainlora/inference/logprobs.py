"""Log-probabilities of the tokens a batch reads and writes, from the forward passes that answer it.

OpenAI's `logprobs` (and lm-evaluation-harness, which scores a model by them) ask two things:
- the prompt's tokens, each under the tokens before it (`echo`): the prefill computes every
  position's logits anyway, so `Prefill` keeps them for the rows that ask (prefill.py) and
  `PromptScores` turns each chunk into per-token entries;
- each generated token, with the most likely alternatives: `Recorder`, a logits processor
  placed before sampling's warpers, sees the model's own logits at every step (before
  temperature and top-p change them, as vLLM's default `raw_logprobs`), and takes the chosen
  token from the next step's input.
Both read the same batched forward pass that answers the row, with its own adapter applied:
the numbers are those of the adapter that answered (tests/test_logprobs.py checks them against
a plain PeftModel forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

LOGIT_BUDGET = 1 << 26  # floats of prompt logits one prefill step may hold (256 MB in fp32)


@dataclass(frozen=True)
class TokenLogprob:
    """One token: its id, its log-probability, and the `top` most likely ids at its position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def entries(logprobs: Any, tokens: Any, k: int) -> list[TokenLogprob]:
    """Entries for `tokens` (n,) under `logprobs` (n, vocab), with the top `k` ids of each row."""
    import torch

    chosen = logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1).tolist()
    if k > 0:
        values, ids = torch.topk(logprobs, k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(int(t), float(c), top) for t, c, top in zip(tokens.tolist(), chosen, tops)]


def score_chunk(rows: int, vocab: int, chunk: int | None) -> int:
    """Prompt positions per prefill step when prompt logprobs are kept: their logits (rows x
    positions x vocab floats) stay within LOGIT_BUDGET, and never more than `chunk`."""
    fits = max(1, LOGIT_BUDGET // max(1, rows * vocab))
    return min(fits, chunk) if chunk else fits


class PromptScores:
    """The prompt tokens' entries of the rows that ask, filled chunk by chunk by the prefill.

    `want`: {row of the batch: top-k}. Rows are left-padded; a row's first real token has no
    entry (None: nothing comes before it), as OpenAI's echo gives."""

    def __init__(self, want: dict[int, int], input_ids: Any, attention_mask: Any):
        self.want, self.ids = dict(want), input_ids
        self.starts = {i: int((attention_mask[i] == 0).sum()) for i in self.want}  # left padding
        self.found: dict[int, list[TokenLogprob]] = {i: [] for i in self.want}

    def add(self, rows: Sequence[int], start: int, logits: Any) -> None:
        """Positions [start, start + logits.shape[1]) of the batch rows `rows` (indices into the
        original batch), each predicting the token after it."""
        import torch

        end = start + logits.shape[1]
        for j, i in enumerate(rows):
            if i not in self.want:
                continue
            first = max(start, self.starts[i])  # padding predicts nothing
            if first >= end:
                continue
            lp = torch.log_softmax(logits[j, first - start:].float(), dim=-1)
            self.found[i] += entries(lp, self.ids[i, first + 1:end + 1], self.want[i])

    def of(self, i: int) -> list[TokenLogprob | None]:
        """Row i's prompt: None for its first token, then an entry per token."""
        return [None, *self.found[i]]


class Recorder:
    """A logits processor that records, per row that asks, each generated token's entry.

    `want`: {row of the batch: top-k}; `n`: the batch's rows. generate calls it with every
    step's logits before sampling; the token chosen from them is recorded by `commit`, called
    with the step's tokens by the stopping criteria (`stopping()`) and by a streamer, whichever
    comes first (the streamer sees them first, so a streamed chunk carries its tokens' entries)."""

    def __init__(self, want: dict[int, int], n: int):
        self.want = dict(want)
        self.rows = list(range(n))  # batch rows in the call (a chunked prefill may drop some)
        self.found: dict[int, list[TokenLogprob]] = {i: [] for i in self.want}
        self.pending: tuple[list[int], Any] | None = None  # (rows of the call, their log-softmax) awaiting a token

    def select(self, rows: list[int]) -> None:
        self.rows = list(rows)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.commit(input_ids[:, -1])  # the previous step's token, if no one committed it yet
        at = [j for j, i in enumerate(self.rows) if i in self.want]
        if at:
            self.pending = (at, torch.log_softmax(scores[at].float(), dim=-1))
        return scores

    def commit(self, tokens: Any) -> None:
        """Record the step's chosen `tokens` (one per row of the call); a second call for the
        same step does nothing."""
        if self.pending is None:
            return
        at, lp = self.pending
        self.pending = None
        chosen = tokens.reshape(-1)[at].to(lp.device)
        for j, e in zip(at, entries(lp, chosen, max(self.want[self.rows[j]] for j in at))):
            i = self.rows[j]
            k = self.want[i]
            self.found[i].append(TokenLogprob(e.token, e.logprob, e.top[:k]))

    def stopping(self) -> Any:
        """A StoppingCriteria that commits each step's tokens and never stops a row."""
        from transformers import StoppingCriteria

        recorder = self

        class Commit(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
                import torch

                recorder.commit(input_ids[:, -1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return Commit()
