"""Check a library's GGUF export in a real llama.cpp (llama-cpp-python), against chainlora's engine.

    make llamacpp-check                      # builds llama-cpp-python once (pip caches the wheel), then this
    python scripts/llamacpp_check.py --library runs/demo/library [--per-task 8] [--max-new-tokens 12]

Exports the library with `--base-dtype f32` (the default model's Q4_1 weights dequantised, the
very values chainlora computes with) and F32 adapters, then for every task adapter and the
demo's test prompts of that task (and the mixed adapter on all of them):

- greedy answers of llama.cpp (base.gguf + the adapter GGUF) against chainlora's engine
  (`Engine.generate(task=...)`), on the same token ids (chainlora's rendering and tokenizer);
- first-token log-probabilities: the largest difference over the 20 most likely tokens;
- with the adapter at scale 0, llama.cpp's answers against chainlora's base model (no adapter);
- whether llama.cpp's own tokenizer gives the same ids for the rendered prompts.

Prints one JSON object; exits 1 when answer agreement is under --min-agreement (0.95) or a
first-token log-probability differs by more than --logprob-tolerance (0.05 nats).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def llama_answer(llm, ids: list[int], ends: set[int], max_new: int) -> tuple[list[int], np.ndarray]:
    """Greedy token ids (to the first end token) and the first position's log-probabilities."""
    llm.reset()
    llm.eval(ids)
    first = log_softmax(np.array(llm.scores[llm.n_tokens - 1]))
    out, logits = [], first
    for _ in range(max_new):
        nxt = int(np.argmax(logits))
        if nxt in ends:
            break
        out.append(nxt)
        llm.eval([nxt])
        logits = np.array(llm.scores[llm.n_tokens - 1])
    return out, first


def chainlora_first(engine, ids: list[int], adapter: str) -> np.ndarray:
    import torch

    with engine.lock, engine.running([adapter]) as (model, extra), torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), **extra).logits[0, -1].float().numpy()
    return log_softmax(logits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", default="runs/demo/library")
    p.add_argument("--per-task", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--min-agreement", type=float, default=0.95)
    p.add_argument("--logprob-tolerance", type=float, default=0.05,
                   help="largest first-token log-probability difference allowed (nats, top 20 tokens)")
    p.add_argument("--out", help="export directory (default: a temporary one)")
    p.add_argument("--result", help="also write the result JSON to this file")
    args = p.parse_args(argv)
    from llama_cpp import Llama, __version__ as llama_version

    from chainlora.data.prompts import ids as token_ids
    from chainlora.data.records import load_demo
    from chainlora.inference.engine import BASE, Engine, Route
    from chainlora.inference.stops import end_ids
    from chainlora.library.export import export

    out = Path(args.out or tempfile.mkdtemp(prefix="chainlora-gguf-"))
    t = time.perf_counter()
    report = export(args.library, out, "gguf", base_dtype="f32")
    export_s = time.perf_counter() - t
    engine = Engine.load(args.library)
    tok, ends = engine.tok, set(end_ids(engine.tok))
    demo = load_demo()
    prompts = {task: [r.text for r in demo[task].test[:args.per_task]] for task in engine.tasks}
    runs = [(task, task, texts) for task, texts in prompts.items()]
    if "mixed" in report["adapters"]:
        runs.append(("mixed", "mixed", [x for texts in prompts.values() for x in texts]))
    rows, worst, same_tokenizer, n_prompts = [], 0.0, 0, 0
    base_llm = None
    for name, adapter, texts in runs:
        ours = engine.generate(texts, task=adapter if adapter != "mixed" else None,
                               routes=None if adapter != "mixed" else
                               [Route(task=None, probability=1.0, adapter="mixed")] * len(texts),
                               max_new_tokens=args.max_new_tokens, temperature=0.0)
        llm = Llama(model_path=str(out / "base.gguf"), lora_path=str(out / report["adapters"][name]["path"]),
                    n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)
        agree = 0
        for text, answer in zip(texts, ours):
            ids = token_ids(tok, engine.render([text])[0])
            got, first = llama_answer(llm, ids, ends, args.max_new_tokens)
            agree += tok.decode(got, skip_special_tokens=True).strip() == answer.text
            mine = chainlora_first(engine, ids, adapter)
            top = np.argsort(-mine)[:20]
            worst = max(worst, float(np.abs(first[top] - mine[top]).max()))
            same_tokenizer += llm.tokenize(engine.render([text])[0].encode(), add_bos=False, special=True) == ids
            n_prompts += 1
        rows.append({"adapter": name, "prompts": len(texts), "answers_equal": agree})
        del llm
    # scale 0: the adapter present but off must give the base model's answers
    texts = [x for texts in prompts.values() for x in texts[:2]]
    base_answers = engine.generate(texts, routes=[Route(task=None, probability=1.0, adapter=BASE)] * len(texts),
                                   max_new_tokens=args.max_new_tokens, temperature=0.0)
    base_llm = Llama(model_path=str(out / "base.gguf"), lora_path=str(out / report["adapters"][engine.tasks[0]]["path"]),
                     lora_scale=0.0, n_ctx=512, logits_all=True, verbose=False, n_threads=2, seed=0)
    zero = sum(tok.decode(llama_answer(base_llm, token_ids(tok, engine.render([x])[0]), ends, args.max_new_tokens)[0],
                          skip_special_tokens=True).strip() == a.text for x, a in zip(texts, base_answers))
    total = sum(r["answers_equal"] for r in rows) / sum(r["prompts"] for r in rows)
    result = {"llama_cpp_python": llama_version, "library": args.library, "export_seconds": round(export_s, 1),
              "answer_agreement": round(total, 4), "per_adapter": rows,
              "first_token_logprob_max_abs_diff_top20": round(worst, 5),
              "scale0_base_agreement": f"{zero}/{len(texts)}",
              "tokenizer_ids_equal": f"{same_tokenizer}/{n_prompts}"}
    text = json.dumps(result, indent=2)
    print(text)
    if args.result:
        Path(args.result).write_text(text + "\n")
    return 0 if total >= args.min_agreement and worst <= args.logprob_tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
