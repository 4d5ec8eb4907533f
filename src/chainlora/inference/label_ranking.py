"""Task selection: which task adapter should answer an instruction.

Two selectors over the library's task-selection LoRA (the "router" adapter), both returning,
per instruction, every task ranked with a score:

- `score` (default, beyond the paper): log P(label + end-of-answer | task_prompt(x)) for every
  label in ONE batched pass — the prompts are prefilled once and their KV cache is repeated
  for all labels — then a softmax over labels. Calibrated top-k probabilities; it can never
  name something that is not a label.
- `generate` (Qiu et al. 2024): generate a few tokens with beam search and find the labels in
  the text with Knuth-Morris-Pratt matching; the best beam's first label wins, the other beams
  fill the top-k, and each label's score is the probability mass of the beams that name it
  first. Text with no label gives an empty ranking (the engine falls back).

Label matching is case- and whitespace-insensitive; where one label contains another
("translate" / "translate_en_fr") the longest label at a position wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from chainlora.data import prompts

ROUTE_CHUNK = 16  # instructions per scoring pass (x labels rows share their prompt's KV cache)


# --------------------------------------------------------------------------- KMP matching


def kmp_table(pattern: str) -> list[int]:
    """failure[i]: length of the longest proper prefix of pattern[:i+1] that is also its suffix."""
    failure = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = failure[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        failure[i] = k
    return failure


def kmp_find(text: str, pattern: str, table: list[int] | None = None) -> int:
    """Index of the first occurrence of `pattern` in `text`, or -1; O(len(text) + len(pattern))."""
    if not pattern:
        return 0
    table = table or kmp_table(pattern)
    k = 0
    for i, ch in enumerate(text):
        while k and ch != pattern[k]:
            k = table[k - 1]
        if ch == pattern[k]:
            k += 1
            if k == len(pattern):
                return i - k + 1
    return -1


def normalize(text: str) -> str:
    """Case-fold and collapse whitespace, so 'Translate  EN_fr' matches 'translate en_fr'."""
    return re.sub(r"\s+", " ", text.casefold()).strip()


@dataclass(frozen=True)
class LabelMatcher:
    """Finds which labels occur in generated text, in order of first occurrence."""

    labels: tuple[str, ...]

    def __post_init__(self) -> None:
        keys = tuple(normalize(label) for label in self.labels)
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_tables", tuple(kmp_table(k) for k in keys))

    def find(self, text: str) -> list[str]:
        """Labels found in `text`, first occurrence first; a label found only inside a longer
        label's match does not count."""
        norm = normalize(text)
        spans = []
        for label, key, table in zip(self.labels, self._keys, self._tables):
            pos = kmp_find(norm, key, table) if key else -1
            if pos >= 0:
                spans.append((pos, -len(key), label))
        spans.sort()
        found, covered = [], []
        for pos, neg_len, label in spans:
            end = pos - neg_len
            if any(s <= pos and end <= e for s, e in covered):
                # Inside a longer label's match; look for a standalone occurrence further on.
                key = normalize(label)
                nxt = _find_outside(norm, key, covered)
                if nxt < 0:
                    continue
                pos, end = nxt, nxt + len(key)
            covered.append((pos, end))
            found.append((pos, label))
        return [label for _, label in sorted(found)]


def _find_outside(text: str, key: str, covered: list[tuple[int, int]]) -> int:
    """First occurrence of `key` not inside any covered span, or -1."""
    start = 0
    while (pos := kmp_find(text[start:], key)) >= 0:
        pos += start
        if not any(s <= pos and pos + len(key) <= e for s, e in covered):
            return pos
        start = pos + 1
    return -1


# --------------------------------------------------------------------------- selectors


@dataclass
class Ranking:
    """One instruction's tasks, best first, with scores (probabilities for `score`)."""

    tasks: list[str]
    scores: list[float]
    text: str | None = None  # what the `generate` selector produced


def _router_inputs(tokenizer: Any, texts: Sequence[str], template: str, system: str | None, device: Any):
    rendered = [prompts.render(tokenizer, prompts.task_prompt(t, "", template), system) for t in texts]
    return tokenizer(rendered, return_tensors="pt", padding=True, padding_side="left",
                     add_special_tokens=False).to(device)


def score_labels(model: Any, tokenizer: Any, texts: Sequence[str], labels: Sequence[str], *,
                 template: str, system: str | None, adapter: str | None = "router") -> Any:
    """log P(label + end-of-answer | task prompt) for every (text, label): a [B, L] tensor.
    adapter None: `model` is a plain model (the `sft` selector), no adapter to name.

    The prompts are prefilled once (left-padded batch); their KV cache is repeated L times and
    all labels (right-padded) run in one more forward pass continuing from it.
    """
    import torch

    enc = _router_inputs(tokenizer, texts, template, system, model.device)
    B, L = enc["input_ids"].shape[0], len(labels)
    end = prompts.end_of_answer(tokenizer)
    label_ids = [tokenizer(lab + end, add_special_tokens=False)["input_ids"] for lab in labels]
    T = max(len(x) for x in label_ids)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([x + [pad] * (T - len(x)) for x in label_ids], device=model.device)  # [L, T]
    lmask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in label_ids], device=model.device)
    with torch.no_grad():
        # Left padding: positions must count real tokens only (a plain forward does not do this).
        pre_pos = (enc["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        names = (lambda n: {"adapter_names": [adapter] * n}) if adapter is not None else (lambda n: {})
        # Only the last position's logits are needed: the full [B, P, vocab] tensor would cost GBs.
        pre = model(**enc, position_ids=pre_pos, use_cache=True, logits_to_keep=1, **names(B))
        first = torch.log_softmax(pre.logits[:, -1].float(), -1)  # [B, V]: predicts label token 0
        # transformers 5.2x renamed the KV cache `past_key_values` -> `cache` (the old name warns);
        # use whichever this model's output declares, and pass it back under the same name
        key = "cache" if "cache" in getattr(pre, "__dataclass_fields__", {}) else "past_key_values"
        cache = pre[key]
        cache.batch_repeat_interleave(L)
        pmask = enc["attention_mask"].repeat_interleave(L, 0)  # [B*L, P]
        n_prompt = pmask.sum(-1, keepdim=True)
        rows_ids, rows_mask = ids.repeat(B, 1), lmask.repeat(B, 1)  # [B*L, T]
        positions = n_prompt + torch.arange(T, device=model.device)
        out = model(input_ids=rows_ids, attention_mask=torch.cat([pmask, rows_mask], 1),
                    position_ids=positions, use_cache=True, **{key: cache}, **names(B * L))
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)  # predicts label tokens 1..T-1
        tok_lp = logp.gather(-1, rows_ids[:, 1:, None]).squeeze(-1) * rows_mask[:, 1:]
        total = tok_lp.sum(-1).view(B, L)
        total = total + first.gather(-1, ids[:, 0].repeat(B, 1)).view(B, L)
    return total


def rank_by_score(model: Any, tokenizer: Any, texts: Sequence[str], tasks: Sequence[str],
                  labels: Sequence[str], *, template: str, system: str | None,
                  adapter: str | None = "router") -> list[Ranking]:
    """The `score` selector: softmax over label log-probabilities, best first (also `sft`'s,
    on its own fine-tuned model, adapter None)."""
    import torch

    logp = score_labels(model, tokenizer, texts, labels, template=template, system=system, adapter=adapter)
    probs = torch.softmax(logp, -1)
    out = []
    for row in probs:
        order = torch.argsort(row, descending=True).tolist()
        out.append(Ranking([tasks[i] for i in order], [float(row[i]) for i in order]))
    return out


def rank_by_generation(model: Any, tokenizer: Any, texts: Sequence[str], tasks: Sequence[str],
                       labels: Sequence[str], *, template: str, system: str | None,
                       adapter: str = "router", beams: int = 3, max_new_tokens: int = 8) -> list[Ranking]:
    """The paper's selector: beam-search a short answer, find labels in it with KMP."""
    import torch

    enc = _router_inputs(tokenizer, texts, template, system, model.device)
    n = enc["input_ids"].shape[0]
    with torch.no_grad():
        out = model.generate(**enc, adapter_names=[adapter] * n, max_new_tokens=max_new_tokens,
                             num_beams=beams, num_return_sequences=beams, do_sample=False,
                             output_scores=True, return_dict_in_generate=True,
                             pad_token_id=tokenizer.pad_token_id)
    texts_out = tokenizer.batch_decode(out.sequences[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    beam_share = torch.softmax(out.sequences_scores.view(n, beams).float(), -1)
    matcher = LabelMatcher(tuple(labels))
    task_of = dict(zip(labels, tasks))
    rankings = []
    for i in range(n):
        scores: dict[str, float] = {}
        for b in range(beams):
            found = matcher.find(texts_out[i * beams + b])
            for j, label in enumerate(found):
                share = float(beam_share[i, b]) if j == 0 else 0.0
                scores[task_of[label]] = scores.get(task_of[label], 0.0) + share
        best = matcher.find(texts_out[i * beams])
        ordered = sorted(scores, key=lambda t: -scores[t])  # stable: best beam's order on ties
        if best:  # the paper's rule: the best beam's first label is the answer
            ordered.remove(task_of[best[0]])
            ordered.insert(0, task_of[best[0]])
        rankings.append(Ranking(ordered, [scores[t] for t in ordered], texts_out[i * beams]))
    return rankings
