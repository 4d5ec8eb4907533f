"""Chunked prefill: a long prompt enters the KV cache a chunk of positions at a time, and the
caller decides between chunks which rows of the batch go on.

transformers' `generate` runs the whole prompt through the model in one forward pass, which
no stopping criterion can interrupt: one prompt of 8,000 tokens held a server's worker for a
minute, past every deadline (issue #43). Here the prompts, all but their last position, go
through the model's own forward `chunk` positions a step, with the attention mask and the
positions generate itself would use (left padding included); before each step `keep` names
the rows still wanted, and the others leave the batch (their rows of the cache, the inputs and
the adapter rows are dropped, so their memory goes back). `generate` then continues from the
filled cache and computes only the last position: the tokens are the ones an unchunked call
makes (tests/test_serve_budgets.py checks it, for the adapter pool and PEFT's mixed batches).

Rows that ask for their prompt's log-probabilities (`scores`, OpenAI's `echo` with `logprobs`)
are always prefilled here, every position's logits kept for them (in chunks small enough that
those logits stay bounded: logprobs.score_chunk), so the prompt is scored by the same forward
pass, with the same adapter, that answers it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from chainlora.inference.logprobs import PromptScores, score_chunk

Keep = Callable[[list[int]], list[int]]  # the rows (indices into the original batch) still wanted


def _forward_params(model: Any) -> set[str]:
    """The keyword names the underlying transformers model's forward takes (PEFT passes them on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


class Prefill:
    """One batch's prefill: `run` it, then `generate(**prefill.generate_inputs(), ...)` for the
    rows left (`rows`, indices into the original batch; empty: every row left)."""

    def __init__(self, model: Any, inputs: dict, extra: dict, pool: Any = None, scores: PromptScores | None = None):
        """inputs: left-padded input_ids and attention_mask; extra: generate's adapter keywords
        (PEFT's adapter_names); pool: the adapter pool whose rows are set for this batch;
        scores: where the prompt log-probabilities of the rows that ask go."""
        self.model, self.inputs, self.extra, self.pool, self.scores = model, dict(inputs), dict(extra), pool, scores
        self.rows = list(range(inputs["input_ids"].shape[0]))
        self.cache: Any = None
        self.positions: Any = None
        params = _forward_params(model)
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5
        self.logits_kw = {"logits_to_keep": 1} if "logits_to_keep" in params and scores is None else {}

    def run(self, chunk: int | None, keep: Keep | None = None) -> Prefill:
        """Fill the cache chunk by chunk when the prompts are longer than one chunk (else leave
        the whole prefill to generate); `keep` is asked before every step and after the last."""
        self._select(keep(list(self.rows)) if keep is not None else self.rows)
        width = self.inputs["input_ids"].shape[1]
        if self.scores is not None:
            chunk = score_chunk(len(self.rows), int(self.model.config.vocab_size), chunk)
        elif chunk is None or width - 1 <= chunk:
            return self
        if width < 2 or not self.rows:
            return self
        mask = self.inputs["attention_mask"]
        self.positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate computes them
        for start in range(0, width - 1, chunk):
            self._step(start, min(start + chunk, width - 1))
            self._select(keep(list(self.rows)) if keep is not None else self.rows)
            if not self.rows:
                break
        return self

    def _step(self, start: int, end: int) -> None:
        """Positions [start, end) of every row into the cache; only the last position's logits are
        made, unless rows keep their prompt's scores (then every position's)."""
        ids, mask = self.inputs["input_ids"], self.inputs["attention_mask"]
        cache = {self.cache_kw: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                         position_ids=self.positions[:, start:end], use_cache=True, **cache, **self.logits_kw,
                         **self.extra)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        if self.scores is not None:
            self.scores.add(self.rows, start, out.logits)

    def _select(self, wanted: list[int]) -> None:
        """Only the `wanted` rows go on: the others' inputs, cache rows and adapter rows are dropped."""
        import torch

        wanted_set = set(wanted)
        kept = [i for i in self.rows if i in wanted_set]
        if kept == self.rows:
            return
        at = [self.rows.index(i) for i in kept]
        self.rows = kept
        if not at:
            self.cache = self.positions = None  # nothing left to run: the whole cache goes back
            return
        index = torch.tensor(at, dtype=torch.long, device=self.inputs["input_ids"].device)
        self.inputs = {k: v[index] for k, v in self.inputs.items()}
        if self.positions is not None:
            self.positions = self.positions[index]
        if self.cache is not None:
            self.cache.batch_select_indices(index)
        if "adapter_names" in self.extra:
            self.extra["adapter_names"] = [self.extra["adapter_names"][i] for i in at]
        if self.pool is not None:
            self.pool.select_rows(at)

    def generate_inputs(self) -> dict:
        """generate's keywords for the rows left: the whole prompts, the adapters, and the cache
        (generate computes only what the cache does not hold)."""
        cache = {self.cache_kw: self.cache} if self.cache is not None else {}
        return {**self.inputs, **self.extra, **cache}
