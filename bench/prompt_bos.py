"""Why a plain prompt opens with BOS (data/prompts.py `bos_text`): the perplexity of one English
paragraph under a base model, scored with and without the BOS its tokenizer adds by itself.

    .venv/bin/python bench/prompt_bos.py [--model gemma3-270m]
"""

from __future__ import annotations

import argparse

import torch

from chainlora.base_model import load_base

TEXT = ("The capital of France is Paris. It is a large city in Europe with many museums and old "
        "churches, and the river Seine runs through it from east to west.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()
    base = load_base(args.model, device="cpu")
    print(f"| {args.model} | with BOS | without BOS |\n|---|---|---|")
    row = []
    for bos in (True, False):
        x = base.tokenizer(TEXT, return_tensors="pt", add_special_tokens=bos)
        with torch.no_grad():
            row.append(float(base.model(**x, labels=x["input_ids"]).loss.exp()))
    print(f"| perplexity | {row[0]:.2f} | {row[1]:.2f} |")


if __name__ == "__main__":
    main()
