"""Answer perplexity under an adapter: the one measurement both the gate at the end of
`chainlora train` (chainlora.train.gate) and `chainlora eval` (Table I) make.

PPL = exp(Σ NLL / N), summed over ALL answer tokens (plus the end-of-answer token) of the records,
in nats — token-weighted, not the mean of per-batch means the Trainer's eval_loss reports.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from chainlora.data.examples import IGNORE, answer_pairs, collator, tokenize
from chainlora.data.records import Record

EVAL_MAX_LENGTH = 1024  # prompt + answer tokens scored; longer prompts lose their start


def record_nll(engine, records: Sequence[Record], adapter: str, batch_size: int = 16,
               model: Any = None) -> list[tuple[float, int]]:
    """(summed NLL in nats, tokens scored) of each record's answer (+ end-of-answer token) under
    `adapter` (a task, "mixed" or engine.BASE) — or under `model` (e.g. Arrow's), same tokens."""
    rows = [tokenize(engine.tok, p, EVAL_MAX_LENGTH, engine.system) for p in answer_pairs(records)]
    return rows_nll(engine, rows, adapter, batch_size, model)


def rows_nll(engine, rows: Sequence[dict], adapter: str, batch_size: int = 16,
             model: Any = None) -> list[tuple[float, int]]:
    """`record_nll` for rows already tokenized (input_ids, attention_mask, labels: -100 where
    not scored): e.g. bench/lm_eval.py scores exactly the tokens lm-evaluation-harness scores."""
    import torch
    import torch.nn.functional as F

    pad = collator(engine.tok)
    out: list[tuple[float, int]] = []
    for i in range(0, len(rows), batch_size):
        batch = pad(rows[i:i + batch_size]).to(engine.base.model.device)
        labels = batch.pop("labels")
        target = labels[:, 1:]
        keep = target != IGNORE  # only answer positions: a vocabulary-wide float copy of a few tokens
        with engine.lock, torch.no_grad():
            run, extra = (model, {}) if model is not None else engine.model_for([adapter] * len(labels))
            logits = run(**batch, **extra).logits[:, :-1][keep].float()
        nll = F.cross_entropy(logits, target[keep], reduction="none")
        rows_of = keep.nonzero()[:, 0]
        sums = torch.zeros(len(labels), dtype=torch.float64).index_add_(0, rows_of.cpu(), nll.double().cpu())
        out += [(float(s), int(n)) for s, n in zip(sums, keep.sum(1))]
    return out


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else float("nan")


def pooled(per: Sequence[tuple[float, int]]) -> tuple[float, int]:
    """Summed NLL and tokens over records: perplexity is token-weighted, not a mean of means."""
    return sum(n for n, _ in per), sum(k for _, k in per)
