"""Supervised examples: (prompt, answer) pairs tokenized for response-only loss.

The prompt is rendered exactly as at inference (chat template, generation prompt) and
tokenized on its own, then the answer plus the end-of-answer token is appended; prompt
positions get label -100 so the loss covers the answer tokens only. Tokenizing the two parts
separately makes the training input identical to what generation sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from chainlora.data import prompts
from chainlora.data.records import Record

IGNORE = -100


@dataclass(frozen=True)
class Pair:
    """What the model sees (user text, before the chat template) and what it should answer."""

    text: str
    answer: str


def answer_pairs(records: Iterable[Record]) -> list[Pair]:
    """Task / mixed adapters: instruction (+ input) -> output."""
    return [Pair(r.text, r.output) for r in records]


def selector_pairs(records: Iterable[Record], labels: dict[str, str], template: str) -> list[Pair]:
    """Task-selection adapter: task_prompt(instruction) -> the task's label."""
    return [Pair(prompts.task_prompt(r.instruction, r.input, template), labels[r.task]) for r in records]


def tokenize(tokenizer: object, pair: Pair, max_length: int, system: str | None = None) -> dict[str, list[int]]:
    """input_ids / attention_mask / labels for one pair, answer-only labels.

    Too long: the prompt loses tokens from its start (the request is at its end), and the
    answer is cut only if it alone does not fit.
    """
    prompt = tokenizer(prompts.render(tokenizer, pair.text, system), add_special_tokens=False)["input_ids"]
    answer = tokenizer(pair.answer + prompts.end_of_answer(tokenizer), add_special_tokens=False)["input_ids"]
    answer = answer[: max(1, max_length - 1)]
    prompt = prompt[-(max_length - len(answer)):] if len(prompt) + len(answer) > max_length else prompt
    ids = prompt + answer
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE] * len(prompt) + answer}


def build_dataset(tokenizer: object, pairs: list[Pair], max_length: int, system: str | None = None):
    """A `datasets.Dataset` of tokenized pairs (Arrow-backed, ready for the Trainer)."""
    import datasets

    rows = [tokenize(tokenizer, p, max_length, system) for p in pairs]
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("input_ids", "attention_mask", "labels")})


def collator(tokenizer: object):
    """Right-pads input_ids with the pad token and labels with -100, per batch.

    DataCollatorForSeq2Seq reads the tokenizer's `padding_side`; it gets its own shallow copy
    set to "right", so the shared tokenizer (left-padded for generation) is never flipped.
    """
    import copy

    from transformers import DataCollatorForSeq2Seq

    right = copy.copy(tokenizer)
    right.padding_side = "right"
    return DataCollatorForSeq2Seq(right, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")
