"""Benchmark (issue 41): memory and step time of LoRA training with gradient checkpointing, bf16 and
a 4-bit / 8-bit base (bitsandbytes), on the default model, against the fp32 baseline.

Every configuration runs in a fresh subprocess that loads smollm2-135m with
chainlora.base_model.load_base (dtype, quantization), prepares it as a training job does
(chainlora.quantization.prepare_for_training), puts chainlora's default LoRA on it (r 8, alpha 16,
q_proj + v_proj) and runs `--steps` optimizer steps of batch 8 x 128 tokens with the Trainer and
the TrainingArguments chainlora trains with (chainlora.train.arguments.training_args). Measured:

    weights MB    bytes of the model's parameters and buffers (exact, machine-independent)
    load RSS      resident memory once the model is loaded and wrapped (VmRSS, after gc and
                  malloc_trim)
    train peak    peak resident memory while training (VmHWM, reset after loading through
                  /proc/self/clear_refs): what the features are for. It counts the pages of the
                  weights file still mapped (clean page cache, reclaimable), so also:
    anon peak     peak anonymous memory while training (RssAnon, sampled every 20 ms)
    process peak  ru_maxrss of the whole child, loading included (a quantised load reads the
                  float weights first)
    step s        median seconds of the steps after the first (which warms up)
    first loss    the loss of the first step (random tokens: it shows what bf16 and quantisation
                  do to the forward, not learning)

The fp32 baseline runs first and last; ratios are against the mean of the two (this invocation,
this machine). A configuration bitsandbytes cannot run here is reported as skipped, with why.

    .venv/bin/python bench/memory.py [--steps 4] [--threads 1] [--only fp32,gc,4bit] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH, LENGTH = 8, 128
# name: (dtype of the base, training.precision, gradient_checkpointing, base_quantization)
CONFIGS = {
    "fp32": ("float32", "fp32", False, None),
    "gc": ("float32", "fp32", True, None),
    "bf16": ("float32", "bf16", False, None),
    "bf16 base": ("bfloat16", "bf16", False, None),
    "bf16 base + gc": ("bfloat16", "bf16", True, None),
    "4bit": ("float32", "fp32", False, "4bit"),
    "4bit + gc": ("float32", "fp32", True, "4bit"),
    "4bit + bf16 + gc": ("bfloat16", "bf16", True, "4bit"),
    "8bit": ("float32", "fp32", False, "8bit"),
}
MARK = "RESULT "


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(name: str, steps: int) -> dict:
    """One configuration, in this process; returns its measurements."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, default_data_collator, set_seed

    from chainlora.base_model import load_base
    from chainlora.errors import ChainloraError
    from chainlora.quantization import prepare_for_training
    from chainlora.train.arguments import training_args
    from chainlora.train.config import TrainingSettings
    from chainlora.train.jobs import Job

    dtype, precision, gc, quant = CONFIGS[name]
    try:
        base = load_base(dtype=dtype, device="cpu", quantization=quant)
    except ChainloraError as e:
        return {"skipped": str(e)}
    prepare_for_training(base.model, quant)
    set_seed(0)
    model = get_peft_model(base.model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": ids}
            for ids in torch.randint(0, len(base.tokenizer), (BATCH * steps, LENGTH), generator=g)]
    settings = TrainingSettings(max_steps=steps, batch_size=BATCH, learning_rate=2e-4, precision=precision,
                                gradient_checkpointing=gc, save_steps=10_000, logging_steps=1)
    job = Job(kind="task", name="bench", path="tasks/bench", train=[], test=[], settings=settings, steps=steps)
    times: list[float] = []
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(model=model, args=training_args(job, Path(work), Path(work) / "logs"),
                          train_dataset=rows, data_collator=default_data_collator, callbacks=[Clock()])
        trainer.args.disable_tqdm = True
        import ctypes
        import gc as garbage

        garbage.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed load-time buffers back to the system
        load_rss, anon = _status_mb("VmRSS"), [_status_mb("RssAnon")]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.02):
                anon.append(_status_mb("RssAnon"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
        trainer.train()
        done.set()
        sampler.join()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    lora = {p.dtype for n, p in model.named_parameters() if "lora_" in n}
    return {"weights_mb": weights, "load_rss_mb": load_rss, "train_peak_mb": _status_mb("VmHWM"),
            "anon_peak_mb": max(anon),
            "process_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "step_s": statistics.median(times[1:] or times), "steps": len(times),
            "loss": round(losses[0], 3) if losses else None,
            "lora_dtype": ",".join(sorted(str(d).removeprefix("torch.") for d in lora))}


def run(name: str, steps: int, threads: int) -> dict:
    """One configuration in a fresh subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(steps)],
                         capture_output=True, text=True, env=env, timeout=600)
    for line in out.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {"skipped": f"failed (exit {out.returncode}): {(out.stderr.strip().splitlines() or ['?'])[-1][:200]}"}


def table(results: list[tuple[str, dict]]) -> str:
    base = [r for n, r in results if n == "fp32" and "skipped" not in r]
    mean = {k: statistics.mean(r[k] for r in base) for k in ("weights_mb", "train_peak_mb", "anon_peak_mb", "step_s")}
    lines = ["| configuration | weights MB | load RSS MB | train peak RSS MB | × fp32 | train peak anon MB | × fp32 "
             "| process peak MB | step s | × fp32 | first loss | LoRA dtype |", "|---" * 12 + "|"]
    for name, r in results:
        if "skipped" in r:
            lines.append(f"| {name} | skipped: {r['skipped']} |" + " |" * 10)
            continue
        loss = r["loss"] if r["loss"] is not None else "-"
        ratio = {k: r[k] / mean[k] for k in mean}
        lines.append(f"| {name} | {r['weights_mb']:.0f} | {r['load_rss_mb']:.0f} | {r['train_peak_mb']:.0f} "
                     f"| {ratio['train_peak_mb']:.2f} | {r['anon_peak_mb']:.0f} | {ratio['anon_peak_mb']:.2f} "
                     f"| {r['process_peak_mb']:.0f} | {r['step_s']:.2f} | {ratio['step_s']:.2f} | {loss} "
                     f"| {r['lora_dtype']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (the first warms up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each child (1: steadier on a busy CPU)")
    parser.add_argument("--only", default="", help="comma-separated configurations (fp32 is always run)")
    parser.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(MARK + json.dumps(child(args.child, args.steps)), flush=True)
        return
    names = [n for n in CONFIGS if n != "fp32" and (not args.only or n in args.only.split(","))]
    t0 = time.perf_counter()
    results = []
    for name in ["fp32", *names, "fp32"]:
        results.append((name, run(name, args.steps, args.threads)))
        print(f"{name}: {results[-1][1]}", file=sys.stderr, flush=True)
    import importlib.metadata

    import torch
    import transformers

    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = "not installed"
    head = (f"{platform.machine()}, {os.cpu_count()} cores ({args.threads} torch thread a child), torch "
            f"{torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bnb}; "
            f"smollm2-135m, LoRA r 8 on q_proj + v_proj, batch {BATCH} x {LENGTH} tokens, {args.steps} steps a "
            f"configuration, fp32 run first and last ({time.perf_counter() - t0:.0f} s in all)")
    cmd = "`.venv/bin/python bench/memory.py " + " ".join(sys.argv[1:]) + "`"
    text = f"{head}\n\n{table(results)}\n\nCommand: {cmd}"
    print(text)
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from results_md import write_section

        write_section("memory", text, "## Memory features (issue 41) — `bench/memory.py`")


if __name__ == "__main__":
    main()
