"""Evaluation of a library: answer perplexity, exact match, task-selection accuracy.

Perplexity is over response tokens only: exp(Σ NLL / N) over ALL answer tokens of a test set
(token-weighted — not the mean of per-batch means the Trainer's eval_loss reports), the
prompt rendered exactly as at inference. Top-k accuracy counts an instruction as correct when
its true task is among the selector's k best; accuracy on held-out instruction templates
(wording the router never saw in training) is reported separately when records carry a
`template` the training split did not use.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from typing import Sequence

from chainlora.data import Record
from chainlora.examples import IGNORE, answer_pairs, collator, tokenize

EVAL_MAX_LENGTH = 1024  # prompt + answer tokens scored; longer prompts lose their start


def answer_nll(chain, records: Sequence[Record], adapter: str, batch_size: int = 16) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of the records' answers (+ end-of-answer token)
    under `adapter` (a task, "mixed" or engine.BASE), and the number of tokens scored."""
    import torch
    import torch.nn.functional as F

    rows = [tokenize(chain.tok, p, EVAL_MAX_LENGTH, chain.system) for p in answer_pairs(records)]
    chain.tok.padding_side = "right"
    pad = collator(chain.tok)
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = pad(rows[i:i + batch_size]).to(chain.base.model.device)
        labels = batch.pop("labels")
        with chain.lock, torch.no_grad():
            model, extra = chain.model_for([adapter] * len(labels))
            logits = model(**batch, **extra).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum"))
        count += int((target != IGNORE).sum())
    return total, count


def perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens) if tokens else float("nan")


def normalize(text: str) -> str:
    """Case, surrounding quotes / punctuation and inner whitespace do not count in a match."""
    return re.sub(r"\s+", " ", text.strip().strip("\"'`.!?;:").strip()).casefold()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


@dataclass
class SelectionScore:
    selector: str
    n: int
    top1: float
    top3: float
    heldout_n: int
    heldout_top1: float
    ms_per_instruction: float

    def to_dict(self) -> dict:
        return asdict(self)


def selection_accuracy(chain, records: Sequence[Record], selector: str,
                       heldout_templates: dict[str, set] | None = None) -> SelectionScore:
    """Route every record's instruction with `selector`; compare with its task."""
    t0 = time.perf_counter()
    routes = chain.route([r.text for r in records], top_k=3, selector=selector)
    ms = 1000 * (time.perf_counter() - t0) / max(len(records), 1)
    hits1 = [bool(rt.top_k) and rt.top_k[0][0] == r.task and not rt.fallback for r, rt in zip(records, routes)]
    hits3 = [any(t == r.task for t, _ in rt.top_k[:3]) for r, rt in zip(records, routes)]
    held = [i for i, r in enumerate(records)
            if heldout_templates and r.meta.get("template") in heldout_templates.get(r.task, ())]
    return SelectionScore(
        selector=selector, n=len(records), top1=sum(hits1) / len(records), top3=sum(hits3) / len(records),
        heldout_n=len(held), heldout_top1=(sum(hits1[i] for i in held) / len(held)) if held else float("nan"),
        ms_per_instruction=ms,
    )
