"""lm-evaluation-harness against `chainlora serve` on a trained library (default: the demo's).

Three kinds of lm-eval task are built from the demo test split (never its training records):
- `cl_ppl_<task>` (loglikelihood), one per demo task: context = the prompt exactly as chainlora
  renders it (chat template, the library's system prompt), target = the answer and the
  end-of-answer token. The harness scores the tokens after the context; its `_encode_pair`
  moves the context's trailing whitespace (the template's newline after `assistant`) into the
  continuation, so it scores that newline token too. chainlora's side is `scoring.rows_nll`,
  the function behind `chainlora eval`'s Table I, on the same ids with the same tokens labelled;
  the two must agree per record to 1e-4. Table I's own perplexity (answer + end token only)
  is printed beside it.
- `cl_sentiment` (multiple choice, acc) and `cl_antonym` (generate_until, exact match).
Each runs for `model=chain`, `mixed` and `base` through one server process; for `chain` the
server routes each prompt by its last user message when it is in the chat template (the
perplexity tasks), else by its decoded text (context and continuation), and chainlora's side
routes the same text with the same selector (`prompts.token_prompt_text`).

    .venv/bin/python bench/lm_eval.py [--library runs/demo/library] [--per-task 10]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PPL = """task: cl_ppl_{task}
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list: [{{metric: perplexity}}]
"""
MC = """task: cl_sentiment
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{text}}}}\\nAnswer:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{output}}}}"
metric_list: [{{metric: acc}}]
"""
GEN = """task: cl_antonym
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}\\nAnswer:"
doc_to_target: "{{{{output}}}}"
generation_kwargs: {{until: ["\\n"], max_gen_toks: 8, do_sample: false, temperature: 0.0}}
metric_list: [{{metric: exact_match}}]
"""


def write_tasks(engine, demo: dict, per_task: int, root: Path) -> dict[str, list]:
    """The task files under root/tasks and their records, by lm-eval task name."""
    from chainlora.data import prompts

    (root / "tasks").mkdir(parents=True)
    out = {}
    end = prompts.end_of_answer(engine.tok)
    for task, td in demo.items():
        recs = td.test[:per_task]
        rows = [{"context": prompts.render(engine.tok, r.text, engine.system), "target": r.output + end} for r in recs]
        out[f"cl_ppl_{task}"] = recs
        _write(root, f"cl_ppl_{task}", PPL.replace("{task}", task), rows)
    for name, template, task in (("cl_sentiment", MC, "sentiment"), ("cl_antonym", GEN, "antonym")):
        recs = demo[task].test[:per_task]
        out[name] = out[f"{name}_chat"] = recs
        rows = [{"text": r.text, "output": r.output} for r in recs]
        _write(root, name, template, rows)
        chat = template.replace('"{{{{text}}}}\\nAnswer:"', '"{{{{text}}}}"\ntarget_delimiter: ""')  # the user message alone
        _write(root, f"{name}_chat", chat.replace(f"task: {name}", f"task: {name}_chat"), rows)
    return out


def _write(root: Path, name: str, template: str, rows: list[dict]) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks" / f"{name}.yaml").write_text(template.format(data=data))


def serve(library: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "chainlora", "serve", library, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if m := re.search(r"on (http://\S+)/v1", line):
            return proc, m.group(1)
    raise SystemExit("chainlora serve did not start")


def lm_eval(url: str, model: str, tokenizer: str, tasks: list[str], root: Path,
            chat: bool = False) -> tuple[dict, dict, float]:
    """(results, samples by task, seconds) of one harness run; `chat`: the harness renders each
    prompt in the tokenizer's chat template (`--apply_chat_template`)."""
    out = root / f"out-{model}{'-chat' if chat else ''}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf"),
           "OPENAI_API_KEY": "none"}
    args = (f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1,tokenized_requests=True")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", ",".join(tasks),
                           "--include_path", str(root / "tasks"), "--model_args", args, "--batch_size", "16",
                           "--output_path", str(out), "--log_samples", *(["--apply_chat_template"] if chat else [])],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {t: [json.loads(x) for x in next(out.rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()] for t in tasks}
    return results, samples, seconds


def harness_rows(engine, context: str, target: str) -> tuple[dict, dict]:
    """(the harness's row: the tokens it scores labelled, Table I's row: answer + end only)."""
    from chainlora.data.examples import IGNORE

    tok = engine.tok
    stripped = context.rstrip()
    whole = tok(context + target, add_special_tokens=False)["input_ids"]
    ctx = len(tok(stripped, add_special_tokens=False)["input_ids"])
    own = len(tok(context, add_special_tokens=False)["input_ids"])
    row = {"input_ids": whole, "attention_mask": [1] * len(whole)}
    return ({**row, "labels": [IGNORE] * ctx + whole[ctx:]}, {**row, "labels": [IGNORE] * own + whole[own:]})


def chainlora_side(engine, samples: list[dict], model: str) -> tuple[list, list, list[str]]:
    """Per record: (-NLL, tokens) over the harness's tokens and over Table I's, and the adapter
    (for chain: routed by the decoded text, as the server routes it)."""
    from chainlora.data import prompts
    from chainlora.inference.answers import BASE
    from chainlora.inference.scoring import rows_nll

    pairs = [harness_rows(engine, s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"])
             for s in samples]
    if model == "chain":
        texts = [prompts.token_prompt_text(engine.tok, h["input_ids"], engine.system) for h, _ in pairs]
        adapters = [r.adapter for r in engine.route(texts)]
    else:
        adapters = [BASE if model == "base" else model] * len(pairs)
    harness: list = [None] * len(pairs)
    table: list = [None] * len(pairs)
    for adapter in set(adapters):
        idx = [i for i, a in enumerate(adapters) if a == adapter]
        for i, (a, b) in zip(idx, zip(rows_nll(engine, [pairs[i][0] for i in idx], adapter),
                                      rows_nll(engine, [pairs[i][1] for i in idx], adapter))):
            harness[i], table[i] = (-a[0], a[1]), (-b[0], b[1])
    return harness, table, adapters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--library", default="runs/demo/library")
    ap.add_argument("--per-task", type=int, default=10)
    ap.add_argument("--work", default="runs/bench-lm-eval", help="task files and the harness's outputs (replaced)")
    args = ap.parse_args()
    import math

    from chainlora.data import load_demo
    from chainlora.inference.engine import Engine

    engine = Engine.load(args.library, device="cpu")
    demo = load_demo()
    tokenizer = engine.base.path
    root = Path(args.work)
    shutil.rmtree(root, ignore_errors=True)
    records = write_tasks(engine, demo, args.per_task, root)
    tasks = [t for t in records if not t.endswith("_chat")]
    proc, url = serve(args.library)
    try:
        runs = {m: lm_eval(url, m, tokenizer, tasks, root) for m in ("chain", "mixed", "base")}
        chats = {m: lm_eval(url, m, tokenizer, ["cl_sentiment_chat", "cl_antonym_chat"], root, chat=True)
                 for m in runs}
    finally:
        proc.terminate()
    print(f"lm-eval {importlib.metadata.version('lm-eval')} against chainlora serve {args.library}, "
          f"{args.per_task} test records a task\n")
    print("| model | harness s | max abs diff, loglikelihood per record | PPL, harness tokens (harness / chainlora) "
          "| PPL, Table I tokens (chainlora) | sentiment acc (raw / chat) | antonym EM (raw / chat) "
          "| routed like `chainlora eval` |")
    print("|---|---|---|---|---|---|---|---|")
    for model, (results, samples, seconds) in runs.items():
        diffs, hl, cl, hn, tl, tn, same = [], 0.0, 0.0, 0, 0.0, 0, []
        for t in (t for t in tasks if t.startswith("cl_ppl_")):
            ours, table, adapters = chainlora_side(engine, samples[t], model)
            harness = [float(s["resps"][0][0][0]) for s in samples[t]]
            diffs += [abs(a - b) for a, (b, _) in zip(harness, ours)]
            hl, cl, hn = hl + sum(harness), cl + sum(b for b, _ in ours), hn + sum(n for _, n in ours)
            tl, tn = tl + sum(b for b, _ in table), tn + sum(n for _, n in table)
            if model == "chain":
                routes = engine.route([r.text for r in records[t]])
                same += [r.adapter == a for r, a in zip(routes, adapters)]
        routed = f"{sum(same)}/{len(same)}" if same else "-"
        print(f"| {model} | {seconds:.0f} | {max(diffs):.2e} | {math.exp(-hl / hn):.3f} / {math.exp(-cl / hn):.3f} "
              f"| {math.exp(-tl / tn):.3f} | {results['cl_sentiment']['acc,none']:.2f} / "
              f"{chats[model][0]['cl_sentiment_chat']['acc,none']:.2f} | {results['cl_antonym']['exact_match,none']:.2f}"
              f" / {chats[model][0]['cl_antonym_chat']['exact_match,none']:.2f} | {routed} |")


if __name__ == "__main__":
    main()
