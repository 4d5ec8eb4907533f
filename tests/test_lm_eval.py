"""lm-evaluation-harness, a client nobody here wrote, against `chainlora serve`: a multiple-choice
task (loglikelihoods: token-id prompts, echo, logprobs) and a generate_until task, from local
files, offline, for `model=chain` and a pinned task. What the harness reports must equal what
chainlora computes itself for the same records: each choice's loglikelihood under a plain PEFT
forward of the adapter that answered (routed by the same selector), each generation the
engine's own answer for the same ids."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chainlora.data import load_demo, prompts
from chainlora.inference.engine import Engine
from test_logprobs import Reference

pytestmark = pytest.mark.slow

MC = """task: cl_sentiment
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{instruction}}}}\\n{{{{input}}}}\\nAnswer:"
doc_to_choice: ["negative", "positive"]
doc_to_target: "{{{{output}}}}"
metric_list:
  - metric: acc
"""

GEN = """task: cl_antonym
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{instruction}}}}\\n{{{{input}}}}\\nAnswer:"
doc_to_target: "{{{{output}}}}"
generation_kwargs:
  until: ["\\n\\n\\n"]
  max_gen_toks: 6
  do_sample: false
  temperature: 0.0
metric_list:
  - metric: exact_match
"""


def write_tasks(root: Path) -> Path:
    demo = load_demo()
    tasks = root / "tasks"
    tasks.mkdir(parents=True)
    for name, task, n, template in (("sentiment", "sentiment", 8, MC), ("antonym", "antonym", 5, GEN)):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n"
                                for r in demo[task].test[:n]))
        (tasks / f"cl_{name}.yaml").write_text(template.format(data=data))
    return tasks


@pytest.fixture(scope="module")
def served(random_lib, tmp_path_factory):
    """`chainlora serve` on the tiny random library, in its own process."""
    proc = subprocess.Popen([sys.executable, "-m", "chainlora", "serve", str(random_lib), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = None
    for line in proc.stdout:  # the line naming the port comes once the model is loaded
        if m := re.search(r"on (http://\S+)/v1", line):
            url = m.group(1)
            break
    assert url, "chainlora serve did not start"
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def lm_eval(url: str, model: str, tokenizer: Path, tasks: Path, out: Path) -> dict:
    """Run the harness's CLI; its results JSON and per-sample records (by task)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "OPENAI_API_KEY": "none"}
    args = (f"model={model},base_url={url}/v1/completions,tokenizer={tokenizer},tokenizer_backend=huggingface,"
            "num_concurrent=1,max_retries=1,tokenized_requests=True")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", "cl_sentiment,cl_antonym",
           "--include_path", str(tasks), "--model_args", args, "--batch_size", "4", "--output_path", str(out),
           "--log_samples"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (results,) = out.rglob("results_*.json")
    samples = {t: [json.loads(line) for line in next(out.rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in ("cl_sentiment", "cl_antonym")}
    return {"results": json.loads(results.read_text())["results"], "samples": samples}


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of a (context, continuation) into token ids (its `_encode_pair`)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tok(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@pytest.mark.parametrize("model", ["chain", "sentiment"])
def test_the_harness_reports_what_chainlora_computes(served, random_lib, tiny_model_dir, tmp_path, model):
    out = lm_eval(served, model, tiny_model_dir, write_tasks(tmp_path), tmp_path / "out")
    engine, reference = Engine.load(random_lib, device="cpu"), Reference(random_lib)

    def adapter(ids: list[int]) -> str:
        if model != "chain":
            return model
        return engine.route([prompts.token_prompt_text(engine.tok, ids, engine.system)])[0].adapter

    right = []
    for s in out["samples"]["cl_sentiment"]:
        lls = []
        for args, [(ll, _greedy)] in zip(s["arguments"].values(), s["resps"]):
            ctx, cont = encode_pair(engine.tok, args["arg_0"], args["arg_1"])
            ours = float(reference(adapter(ctx + cont), ctx + cont)[len(ctx) - 1:].sum())
            assert abs(float(ll) - ours) < 1e-4, (s["doc_id"], ll, ours)
            lls.append(ours)
        right.append(float(lls.index(max(lls)) == ["negative", "positive"].index(s["target"])))
    assert out["results"]["cl_sentiment"]["acc,none"] == pytest.approx(sum(right) / len(right))

    matches = []
    for s in out["samples"]["cl_antonym"]:
        context = s["arguments"]["gen_args_0"]["arg_0"]
        ids = engine.tok(context, add_special_tokens=False)["input_ids"]
        text = prompts.token_prompt_text(engine.tok, ids, engine.system)  # what the server routes on
        (a,) = engine.generate([text], rendered=[ids], task=None if model == "chain" else model,
                               max_new_tokens=6, stop=["\n\n\n", engine.tok.eos_token])
        assert s["resps"][0][0] == a.text
        matches.append(float(a.text.strip() == s["target"]))
    assert out["results"]["cl_antonym"]["exact_match,none"] == pytest.approx(sum(matches) / len(matches))
    # a stop the random adapters rarely write, so the answers compared are real text, not all empty
    assert sum(bool(s["resps"][0][0].strip()) for s in out["samples"]["cl_antonym"]) >= len(matches) // 2
