"""Benchmark: training throughput of one task adapter, chainlora vs a plain PEFT + Trainer script.

Both sides train the same LoRA (r, alpha, targets) on the same demo task records, rendered
with the same chat template and response-only labels, with the same Trainer settings; both
report tokens/s = non-padding input tokens / seconds inside `trainer.train()`. They alternate
in one process (baseline, chainlora, baseline, chainlora, ...) and the medians are compared.

    .venv/bin/python bench/train_throughput.py [--steps 10] [--repeats 2] [--task antonym]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

SETTINGS = dict(batch_size=8, max_length=96, learning_rate=2e-3, r=8, alpha=16, dropout=0.05)
SYSTEM = "Answer briefly."


def plain_peft(model_dir: str, records: list, steps: int) -> float:
    """What a user writes by hand: PEFT + Trainer, no chainlora. Returns tokens/s."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    set_seed(0)
    model = get_peft_model(model, LoraConfig(r=SETTINGS["r"], lora_alpha=SETTINGS["alpha"],
                                             lora_dropout=SETTINGS["dropout"],
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for r in records:
        text = r.instruction + (f"\n\n{r.input}" if r.input else "")
        prompt = tok.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}],
                                         tokenize=False, add_generation_prompt=True)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r.output + tok.eos_token, add_special_tokens=False)["input_ids"]
        ids = (p + a)[-SETTINGS["max_length"]:]
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(([-100] * len(p) + a)[-SETTINGS["max_length"]:])
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=SETTINGS["batch_size"],
                                 learning_rate=SETTINGS["learning_rate"], lr_scheduler_type="cosine",
                                 save_strategy="no", report_to="none", logging_steps=steps,
                                 remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
                                 disable_tqdm=True, seed=0, data_seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows),
                          data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0
    return trainer.state.num_input_tokens_seen / seconds


def with_chainlora(task: str, steps: int, out: Path) -> float:
    """The same job through `chainlora train`; tokens/s from the library manifest."""
    from chainlora.library import Library
    from chainlora.train import config, train_library

    cfg = config.from_dict({
        "system_prompt": SYSTEM, "tasks": [task],
        "lora": {"r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": SETTINGS["dropout"]},
        "training": {"max_steps": steps, "batch_size": SETTINGS["batch_size"], "max_length": SETTINGS["max_length"],
                     "learning_rate": SETTINGS["learning_rate"], "save_steps": 10_000},
        "data": {"max_test_per_task": 8},
        "router": {"enabled": False}, "mixed": {"enabled": False},
    })
    train_library(cfg, out, force=True)
    entry = Library.open(out).task(task)
    return entry["tokens"] / entry["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--task", default="antonym")
    args = parser.parse_args()

    import torch

    from chainlora.data import load_demo
    from chainlora.base_model import load_base

    model_dir = load_base().path  # the cached safetensors copy of the default model
    records = load_demo()[args.task].train
    base_tps, chain_tps = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            base_tps.append(plain_peft(model_dir, records, args.steps))
            chain_tps.append(with_chainlora(args.task, args.steps, Path(tmp) / f"lib{i}"))
    b, c = statistics.median(base_tps), statistics.median(chain_tps)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"task {args.task}, {args.steps} steps x batch {SETTINGS['batch_size']}, {args.repeats} repeats")
    print("| what | tokens/s (median) | runs | ratio |")
    print("|---|---|---|---|")
    print(f"| plain PEFT + Trainer (baseline) | {b:.0f} | {', '.join(f'{x:.0f}' for x in base_tps)} | 1.00 |")
    print(f"| chainlora train | {c:.0f} | {', '.join(f'{x:.0f}' for x in chain_tps)} | {c / b:.3f} |")


if __name__ == "__main__":
    main()
