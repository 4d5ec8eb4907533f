"""Check a library's GGUF export in a real llama.cpp (llama-cpp-python), against chainlora's engine.

    make llamacpp-check                      # builds llama-cpp-python once (pip caches the wheel), then this
    python scripts/llamacpp_check.py --library runs/demo/library [--per-task 8] [--max-new-tokens 12]
    python scripts/llamacpp_check.py --random-library gemma3-270m --library runs/gemma3-random --per-task 4

The architecture is the export's (export.json `base.arch`: llama, gemma3 or qwen2), which the
export reads from the base model itself; the check is the same for each. --random-library BASE
first writes a library of random LoRA adapters (every projection, B drawn with --random-std, as
the tests build theirs) on BASE at --library: a check of a second architecture without training.

Exports the library with `--base-dtype f32` (the base GGUF's weights dequantised: the very values
chainlora computes with) and F32 adapters, then for every task adapter and the demo's test
prompts of that task (and the mixed adapter on all of them):

- greedy answers of llama.cpp (base.gguf + the adapter GGUF) against chainlora's engine
  (`Engine.generate(task=...)`, transformers + PEFT), on the same token ids (chainlora's rendering
  and tokenizer);
- along llama.cpp's greedy path, transformers + PEFT fed the same ids: whether its argmax is
  llama.cpp's token at every step, and the largest log-probability difference over its 20 most
  likely tokens at every step; beside it how far the adapter moves those log-probabilities (the
  same forward without it), so an adapter llama.cpp ignored could not pass;
- with the adapter at scale 0, llama.cpp's answers against chainlora's base model (no adapter);
- whether llama.cpp's own tokenizer gives the same ids for the rendered prompts.

Prints one JSON object; exits 1 when answer agreement is under --min-agreement (0.95) or a
log-probability differs by more than --logprob-tolerance (0.05 nats).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def llama_answer(llm, ids: list[int], ends: set[int], max_new: int) -> tuple[list[int], np.ndarray]:
    """Greedy token ids (the end token included when one ends it) and the log-probabilities of
    every step that chose one of them."""
    llm.reset()
    llm.eval(ids)
    out, rows = [], []
    for _ in range(max_new):
        rows.append(log_softmax(np.array(llm.scores[llm.n_tokens - 1])))
        out.append(int(np.argmax(rows[-1])))
        if out[-1] in ends:
            break
        llm.eval([out[-1]])
    return out, np.stack(rows)


def engine_steps(engine, ids: list[int], path: list[int], adapter: str) -> np.ndarray:
    """transformers + PEFT (the engine's model) on prompt + path: each step's log-probabilities."""
    import torch

    with engine.lock, engine.running([adapter]) as (model, extra), torch.no_grad():
        logits = model(input_ids=torch.tensor([ids + path[:-1]]), **extra).logits[0, len(ids) - 1:].float().numpy()
    return log_softmax(logits)


def compare_path(engine, ids: list[int], path: list[int], theirs: np.ndarray, adapter: str) -> dict:
    """Along llama.cpp's greedy path: steps where transformers' argmax agrees, the largest
    log-probability difference over transformers' top 20 per step, and the adapter's own effect."""
    from chainlora.inference.engine import BASE

    mine = engine_steps(engine, ids, path, adapter)
    base = engine_steps(engine, ids, path, BASE)
    top = np.argsort(-mine, axis=-1)[:, :20]
    pick = np.take_along_axis
    return {"steps": len(path), "tokens_equal": int((mine.argmax(-1) == np.array(path)).sum()),
            "max_diff": float(np.abs(pick(theirs, top, -1) - pick(mine, top, -1)).max()),
            "adapter_effect": float(np.abs(pick(base, top, -1) - pick(mine, top, -1)).max())}


def make_random_library(root: Path, base_name: str, tasks: list[str], r: int, std: float) -> None:
    """A library of random LoRA adapters (A as PEFT draws it, B ~ N(0, std)) on every projection
    of `base_name`, one per task plus a mixed one, written with chainlora.library."""
    import torch
    from peft import LoraConfig, get_peft_model

    from chainlora import library
    from chainlora.base_model import load_base

    base = load_base(base_name, device="cpu")
    manifest = library.new_manifest(base_name, base.fingerprint, {}, "random", None)
    for i, name in enumerate(tasks + ["mixed"]):
        torch.manual_seed(1000 + i)
        model = get_peft_model(base.model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=MODULES,
                                                      task_type="CAUSAL_LM"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, std)
        path = library.task_path(name) if name in tasks else name
        entry = {"name": name, "path": path, "sha256": library.save_adapter(model, root, path)}
        base.model = model.unload()
        if name in tasks:
            manifest["tasks"].append({**entry, "label": name})
        else:
            manifest["mixed"] = entry
    manifest["complete"] = True
    library.write_manifest(root, manifest)


def check_adapter(engine, llm, name: str, texts: list[str], args, ends: set[int]) -> dict:
    """One adapter on its prompts: answers (engine.generate) and the greedy path, compared."""
    from chainlora.data.prompts import ids as token_ids
    from chainlora.inference.engine import Route

    ours = engine.generate(texts, routes=[Route(task=None, probability=1.0, adapter=name)] * len(texts),
                           max_new_tokens=args.max_new_tokens, temperature=0.0)
    row = {"adapter": name, "prompts": len(texts), "answers_equal": 0, "steps": 0, "tokens_equal": 0,
           "max_diff": 0.0, "adapter_effect": 0.0, "tokenizer_ids_equal": 0}
    for text, answer in zip(texts, ours):
        rendered = engine.render([text])[0]
        ids = token_ids(engine.tok, rendered)
        path, theirs = llama_answer(llm, ids, ends, args.max_new_tokens)
        words = engine.tok.decode([t for t in path if t not in ends], skip_special_tokens=True).strip()
        row["answers_equal"] += words == answer.text
        step = compare_path(engine, ids, path, theirs, name)
        for key in ("steps", "tokens_equal"):
            row[key] += step[key]
        row["max_diff"] = max(row["max_diff"], step["max_diff"])
        row["adapter_effect"] = max(row["adapter_effect"], step["adapter_effect"])
        row["tokenizer_ids_equal"] += llm.tokenize(rendered.encode(), add_bos=False, special=True) == ids
    return row


def scale_zero(engine, llama_cls, out: Path, report: dict, texts: list[str], args, ends: set[int]) -> str:
    """The adapter loaded at scale 0 must give the base model's answers: 'equal/asked'."""
    from chainlora.data.prompts import ids as token_ids
    from chainlora.inference.engine import BASE, Route

    answers = engine.generate(texts, routes=[Route(task=None, probability=1.0, adapter=BASE)] * len(texts),
                              max_new_tokens=args.max_new_tokens, temperature=0.0)
    llm = llama_cls(model_path=str(out / "base.gguf"), lora_path=str(out / report["adapters"][engine.tasks[0]]["path"]),
                    lora_scale=0.0, n_ctx=512, logits_all=True, verbose=False, n_threads=args.threads, seed=0)
    equal = 0
    for text, answer in zip(texts, answers):
        path, _ = llama_answer(llm, token_ids(engine.tok, engine.render([text])[0]), ends, args.max_new_tokens)
        equal += engine.tok.decode([t for t in path if t not in ends], skip_special_tokens=True).strip() == answer.text
    return f"{equal}/{len(texts)}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--random-library", metavar="BASE",
                   help="first write a library of random LoRA adapters on BASE (alias, .gguf or directory) at --library")
    p.add_argument("--random-tasks", type=int, default=3, help="demo tasks in the random library")
    p.add_argument("--random-rank", type=int, default=8)
    p.add_argument("--random-std", type=float, default=0.02, help="standard deviation of the random B")
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument("--logprob-tolerance", type=float, default=0.05,
                   help="largest log-probability difference allowed (nats, transformers' top 20 tokens, every step)")
    p.add_argument("--out", help="export directory (default: a temporary one)")
    p.add_argument("--result", help="also write the result JSON to this file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from llama_cpp import Llama, __version__ as llama_version

    from chainlora.data.records import load_demo
    from chainlora.inference.engine import Engine
    from chainlora.inference.stops import end_ids
    from chainlora.library.export import export

    demo = load_demo()
    if args.random_library:
        make_random_library(Path(args.library), args.random_library, sorted(demo)[:args.random_tasks],
                            args.random_rank, args.random_std)
    out = Path(args.out or tempfile.mkdtemp(prefix="chainlora-gguf-"))
    t = time.perf_counter()
    report = export(args.library, out, "gguf", base_dtype="f32")
    export_s = time.perf_counter() - t
    engine = Engine.load(args.library, device="cpu")
    ends = set(end_ids(engine.tok))
    prompts = {task: [r.text for r in demo[task].test[:args.per_task]] for task in engine.tasks}
    runs = list(prompts.items()) + ([("mixed", [x for v in prompts.values() for x in v])]
                                    if "mixed" in report["adapters"] else [])
    rows = []
    for name, texts in runs:
        llm = Llama(model_path=str(out / "base.gguf"), lora_path=str(out / report["adapters"][name]["path"]),
                    n_ctx=512, logits_all=True, verbose=False, n_threads=args.threads, seed=0)
        rows.append(check_adapter(engine, llm, name, texts, args, ends))
        del llm
    zero = scale_zero(engine, Llama, out, report, [x for v in prompts.values() for x in v[:2]], args, ends)
    total = sum(r["answers_equal"] for r in rows) / sum(r["prompts"] for r in rows)
    worst = max(r["max_diff"] for r in rows)
    result = {"llama_cpp_python": llama_version, "library": args.library, "arch": report["base"]["arch"],
              "export_seconds": round(export_s, 1), "answer_agreement": round(total, 4),
              "greedy_tokens_equal": f"{sum(r['tokens_equal'] for r in rows)}/{sum(r['steps'] for r in rows)}",
              "logprob_max_abs_diff_top20": round(worst, 5),
              "adapter_effect_max_top20": round(max(r["adapter_effect"] for r in rows), 3),
              "scale0_base_agreement": zero, "per_adapter": rows,
              "tokenizer_ids_equal": f"{sum(r['tokenizer_ids_equal'] for r in rows)}/{sum(r['prompts'] for r in rows)}"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.result:
        Path(args.result).write_text(text + "\n")
    return 0 if total >= args.min_agreement and worst <= args.logprob_tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
