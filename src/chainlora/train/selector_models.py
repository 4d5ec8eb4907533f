"""Training the selectors that are not LoRA adapters: the `classifier` (a frozen encoder and a
linear head), the `encoder` (the same encoder fine-tuned end to end, Table III's BERT-SFT) and
`sft` (a copy of the whole base model fine-tuned on task_prompt -> label, Table III's
Bloomz-SFT). The task-selection LoRA trains like every other adapter (chainlora.train.lora_job)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from chainlora.library import kinds, store
from chainlora.train import staging
from chainlora.train.config import Config
from chainlora.train.distributed import on_main
from chainlora.train.plan import Job


def run_selector_job(job: Job, base: Any, cfg: Config, root: Path, progress: Any = None) -> dict:
    """Train a selector job of its own kind (its registered `train` function) into `root`; its entry."""
    return kinds.resolve(kinds.ENTRIES[job.kind].train)(job, base, cfg, root, progress)


def _accuracy(logits: Any, y: Any) -> float:
    return round(float((logits.argmax(-1) == y).float().mean()), 4)


def _save(root: Path, job: Job, write: Any, files: tuple[str, ...]) -> str:
    """Write the selector atomically on the main process; its sha256."""
    from accelerate import PartialState

    from chainlora import atomic

    def save() -> str:
        with atomic.directory(store.inside(root, job.path), replace=True) as tmp:
            write(tmp)
            return store.adapter_sha256(tmp, files)

    return on_main(PartialState(), save)


def run_classifier_job(job: Job, base: Any, cfg: Config, root: Path, progress: Any = None) -> dict:
    """Embed the instructions with the frozen encoder and fit the linear head (no Trainer:
    a full-batch probe on fixed features is a few hundred tiny steps)."""
    import torch

    from chainlora.inference import classifier

    t0 = time.perf_counter()
    tasks = job.info["tasks"]
    encoder = classifier.FrozenEncoder(cfg.classifier.encoder, base.model, base.tokenizer)
    x = encoder.embed([p.text for p in job.train])
    y = torch.tensor([tasks.index(p.answer) for p in job.train])
    head, loss = classifier.train_head(x, y, len(tasks), epochs=job.steps,
                                       lr=cfg.classifier.learning_rate, seed=cfg.training.seed)
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": 0, "train_loss": round(loss, 5)}
    with torch.no_grad():
        entry["train_accuracy"] = _accuracy(head(x), y)
        if job.test:
            xt = encoder.embed([p.text for p in job.test])
            entry["test_accuracy"] = _accuracy(head(xt), torch.tensor([tasks.index(p.answer) for p in job.test]))
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    info = {"encoder": cfg.classifier.encoder, "tasks": tasks}
    entry["sha256"] = _save(root, job, lambda d: classifier.save(d, head, info), classifier.FILES)
    return entry


class _Examples:
    """Tokenized (instruction, task index) pairs as a map-style dataset for the Trainer."""

    def __init__(self, tokenizer: Any, texts: list[str], labels: list[int], max_length: int):
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.rows = [{"input_ids": i, "attention_mask": m, "labels": y}
                     for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def fit_encoder(texts: list[str], y: list[int], n_classes: int, steps: int, cfg: Config,
                workdir: Path) -> tuple[Any, Any, float]:
    """Fine-tune all-MiniLM-L6-v2 and a linear head on instruction -> task index with the Trainer;
    (model, tokenizer, training loss). `encoder.swap_content` of the instructions have their
    content words swapped first; the head starts as a linear probe on the frozen features (LP-FT)."""
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback

    from chainlora.data.content import swap_content
    from chainlora.inference import classifier, encoder
    from chainlora.train.arguments import use_cpu

    e, seed = cfg.encoder, cfg.training.seed
    set_seed(seed)
    texts = swap_content(texts, e.swap_content, seed)
    model, tok = encoder.build(n_classes)
    probe = classifier.FrozenEncoder.wrap("minilm", model.encoder, tok)  # frozen: this very encoder, before training
    head, _ = classifier.train_head(probe.embed(texts), torch.tensor(y), n_classes,
                                    epochs=cfg.classifier.epochs, lr=cfg.classifier.learning_rate, seed=seed)
    model.head.load_state_dict(head.state_dict())
    args = TrainingArguments(
        output_dir=str(workdir), max_steps=steps,
        per_device_train_batch_size=e.batch_size, learning_rate=e.learning_rate, lr_scheduler_type="linear",
        warmup_steps=max(1, steps // 10), weight_decay=0.01, seed=seed,
        data_seed=seed, save_strategy="no", report_to="none", remove_unused_columns=False,
        logging_strategy="no", dataloader_num_workers=0, use_cpu=use_cpu(), disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Examples(tok, texts, y, e.max_length),
                      data_collator=DataCollatorWithPadding(tok))
    trainer.remove_callback(PrinterCallback)  # with disable_tqdm it prints a metrics dict into the log
    result = trainer.train()
    return model.eval(), tok, result.training_loss


def run_encoder_job(job: Job, base: Any, cfg: Config, root: Path, progress: Any = None) -> dict:
    """Train the `encoder` selector (fit_encoder) on the job's instructions and save it."""
    import torch

    from chainlora.inference import encoder

    t0 = time.perf_counter()
    e, tasks = cfg.encoder, job.info["tasks"]
    texts, y = [p.text for p in job.train], [tasks.index(p.answer) for p in job.train]
    model, tok, loss = fit_encoder(texts, y, len(tasks), job.steps, cfg, root / staging.WORK / "encoder")
    info = {"encoder": "all-MiniLM-L6-v2", "tasks": tasks, "max_length": e.max_length}
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": 0, "train_loss": round(loss, 5)}
    entry["train_accuracy"] = _accuracy(encoder.logits(model, tok, texts, e.max_length), torch.tensor(y))
    if job.test:
        yt = torch.tensor([tasks.index(p.answer) for p in job.test])
        entry["test_accuracy"] = _accuracy(encoder.logits(model, tok, [p.text for p in job.test], e.max_length), yt)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    entry["sha256"] = _save(root, job, lambda d: encoder.save(d, model, info), encoder.FILES)
    return entry


def run_sft_job(job: Job, base: Any, cfg: Config, root: Path, progress: Any = None) -> dict:
    """Fine-tune every weight of a copy of the base model on task_prompt -> label with the
    Trainer (the base itself stays untouched for the jobs after it); save it as a plain
    transformers model (config.json + model.safetensors). No mid-job checkpoints: each would be
    a whole model and its optimizer state."""
    import copy
    import dataclasses

    from transformers import Trainer, set_seed
    from transformers.trainer_callback import ProgressCallback

    from chainlora.data.examples import build_dataset, collator
    from chainlora.train.arguments import training_args

    t0 = time.perf_counter()
    set_seed(job.settings.seed)
    model = copy.deepcopy(base.model)
    model.hf_quantizer = None  # a GGUF-loaded base refuses save_pretrained otherwise
    for p in model.parameters():
        p.requires_grad_(True)
    tok, system = base.tokenizer, cfg.system_prompt
    args = dataclasses.replace(training_args(job, root / staging.WORK / "sft", root / "logs" / "sft"),
                               save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=build_dataset(tok, job.train, job.settings.max_length, system),
                      data_collator=collator(tok), callbacks=[progress.callback(job)] if progress else [])
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(progress.step_bar())
    result = trainer.train()
    entry = {**job.info, "path": job.path, "n_train": len(job.train), "n_test": len(job.test),
             "steps": job.steps, "tokens": int(trainer.state.num_input_tokens_seen),
             "train_loss": round(result.training_loss, 5)}
    if job.test:
        test = build_dataset(tok, job.test, job.settings.max_length, system)
        entry["test_loss"] = round(trainer.evaluate(test)["eval_loss"], 5)
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    model = model.eval()
    save = functools.partial(model.save_pretrained, safe_serialization=True)  # no closure over `model`
    entry["sha256"] = _save(root, job, save, store.SFT_FILES)
    entry["parameters"] = sum(p.numel() for p in model.parameters())
    del trainer, model, save
    return entry
