#!/usr/bin/env bash
# GPU check of the memory features (issue 41), unattended, under 10 minutes on one CUDA GPU:
#
#   bitsandbytes-cuda   4-bit and 8-bit layers run forward + backward on the GPU
#   gpu-memory-MODEL    one task adapter, three ways: fp32 / bf16 + gradient checkpointing /
#                       4-bit base + bf16 + gradient checkpointing: peak GPU memory and s/step
#   train-MODEL         a few demo tasks + router + mixed with bf16 + gradient checkpointing +
#                       4-bit base (QLoRA): every task adapter beats the base model's test loss
#   peft-load-MODEL     each task adapter loads in plain PEFT on the unquantised base, on cuda,
#                       with the logits of chainlora's engine
#   serve-pool-MODEL    the adapter pool on cuda: a mixed batch over the tasks (bench/engine.py P2)
#   serve-http-pool     `chainlora serve --device cuda --adapters pool`, concurrent requests to
#                       every adapter (bench/serve_memory.py's client): no errors
#
# for the default model and the second family (MODEL2, default gemma3-270m: `make second-model`
# or `chainlora model gemma3-270m` first). One line a check: `PASS name detail` / `FAIL name
# detail`; exit 1 if any failed, 2 (one line) where no CUDA GPU is visible. The runs' own output
# goes to OUT/checks.log and OUT/stderr.log.
#
#   scripts/gpu_check.sh                       # needs .venv with a CUDA torch and chainlora[qlora]
#   MODEL2=./my-model OUT=runs/gpu-check BUDGET=570 PY=.venv/bin/python scripts/gpu_check.sh
#   DEVICE=cpu MODEL1=DIR MODEL2=DIR scripts/gpu_check.sh   # the script's own smoke test, no GPU
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cuda}
MODEL1=${MODEL1:-smollm2-135m}
MODEL2=${MODEL2:-gemma3-270m}
OUT=${OUT:-runs/gpu-check}
BUDGET=${BUDGET:-570}  # seconds for everything; a check still running then is a FAIL

if [ ! -x "$PY" ]; then
  echo "gpu_check: no Python at $PY (make install TORCH_PIP_ARGS='--index-url <a CUDA wheel index>', then pip install -e '.[qlora]')" >&2
  exit 2
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is false): nothing checked" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
timeout --signal=TERM "$BUDGET" "$PY" - "$OUT" "$DEVICE" "$MODEL1" "$MODEL2" 2> "$OUT/stderr.log" <<'PYTHON'
import asyncio, contextlib, gc, socket, subprocess, sys, time
from pathlib import Path

import torch

sys.path.insert(0, "bench")
out, device, models = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
cuda = device == "cuda"
TASKS = ["antonym", "sentiment", "rhyme", "translate_en_fr"]
failed = []


def line(ok, name, detail):
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failed.append(name)


def check(name, fn, *args):
    try:  # what the run prints (plans, summaries) goes to OUT/checks.log: one line a check here
        with open(out / "checks.log", "a") as log, contextlib.redirect_stdout(log):
            ok, detail = fn(*args)
    except BaseException as e:  # one line, whatever went wrong; the traceback goes to stderr.log
        import traceback

        traceback.print_exc()
        ok, detail = False, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
    line(ok, name, detail)
    return ok


def fresh():
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib():
    """Peak GPU memory since fresh() (on cpu: peak RSS)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    rows = [r for r in Path("/proc/self/status").read_text().splitlines() if r.startswith("VmHWM:")]
    return int(rows[0].split()[1]) / 2**20


def device_name():
    return torch.cuda.get_device_name() if cuda else "cpu"


def config(model, tasks, quant, dtype, precision, gc_on, steps, **more):
    from chainlora.train import config as cfgmod

    return cfgmod.from_dict({
        "base_model": model, "dtype": dtype, "base_quantization": quant, "tasks": tasks,
        "data": {"max_train_per_task": 400, "max_test_per_task": 16},
        "training": {"max_steps": steps, "batch_size": 16, "max_length": 256, "learning_rate": 1e-3,
                     "precision": precision, "gradient_checkpointing": gc_on, "save_steps": 10_000},
        "selection": {"selectors": ["score"]}, **more}, "gpu_check")


def bnb_cuda():
    import bitsandbytes

    from chainlora import quantization

    for mode in quantization.MODES:
        quantization.check(mode, device)
    return True, f"bitsandbytes {bitsandbytes.__version__}: 4bit and 8bit forward + backward on {device_name()}"


def memory(model):
    from chainlora.library import Library
    from chainlora.train import train_library

    rows = {}
    for name, (quant, dtype, precision, gc_on) in {"fp32": (None, "float32", "fp32", False),
                                                   "bf16+gc": (None, "bfloat16", "bf16", True),
                                                   "4bit+bf16+gc": ("4bit", "bfloat16", "bf16", True)}.items():
        fresh()
        cfg = config(model, TASKS[:1], quant, dtype, precision, gc_on, 20, router={"enabled": False},
                     mixed={"enabled": False}, selection={"enabled": False})
        root = train_library(cfg, out / f"mem-{Path(model).name}-{name}", force=True)
        entry = Library.open(root).task(TASKS[0])
        rows[name] = (peak_gib(), entry["seconds"] / entry["steps"])
    base = rows["fp32"][0]
    detail = ", ".join(f"{k} {gb:.2f} GiB ({gb / base:.2f}x) {s:.3f} s/step" for k, (gb, s) in rows.items())
    return rows["4bit+bf16+gc"][0] < base and rows["bf16+gc"][0] < base, f"peak {device} memory: " + detail


def train(model):
    from chainlora.library import Library
    from chainlora.train import train_library

    fresh()
    cfg = config(model, TASKS, "4bit", "bfloat16", "bf16", True, 40, router={"training": {"max_steps": 40}},
                 mixed={"budget": 60})
    t0 = time.perf_counter()
    root = train_library(cfg, out / f"lib-{Path(model).name}", force=True)
    lib = Library.open(root)
    worse = [t["name"] for t in lib.tasks if not t["test_loss"] < t["base_test_loss"]]
    tps = sum(t["tokens"] for t in lib.tasks) / sum(t["seconds"] for t in lib.tasks)
    losses = " ".join(f"{t['name']} {t['base_test_loss']:.2f}->{t['test_loss']:.2f}" for t in lib.tasks)
    return not worse, (f"{len(lib.tasks)} tasks + router + mixed in {time.perf_counter() - t0:.0f} s, "
                       f"{tps:.0f} train tokens/s, peak {peak_gib():.2f} GiB; "
                       f"test loss base->adapter {losses}" + (f"; NOT better: {worse}" if worse else ""))


def peft_load(model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chainlora.inference.engine import Engine

    engine = Engine.load(out / f"lib-{Path(model).name}", device=device)
    ids = engine.tok("Give the antonym of the word hot.", return_tensors="pt")["input_ids"].to(device)
    worst = 0.0
    for entry in engine.lib.tasks:
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(engine.base.path, dtype=torch.float32),
                                          str(engine.lib.root / entry["path"])).to(device).eval()
        with torch.no_grad():
            a = plain(ids).logits
            b = engine.cache.acquire([entry["name"]])(ids, adapter_names=[engine.cache.slot(entry["name"])]).logits
        worst = max(worst, (a - b).abs().max().item())
        del plain
    return worst < 1e-3, f"{len(engine.lib.tasks)} adapters, plain PEFT vs engine logits max |diff| {worst:.2e} (fp32, {device})"


def serve_pool(model):
    from engine import p2

    from chainlora.data import load_demo
    from chainlora.inference.engine import Engine

    engine = Engine.load(out / f"lib-{Path(model).name}", device=device, dtype="bfloat16" if cuda else "float32",
                         adapters="pool")
    demo = load_demo()
    tasks = [t for t in TASKS for _ in range(4)]
    texts = [demo[t].test[i].text for t in TASKS for i in range(4)]
    answers = engine.generate(texts, task=tasks, max_new_tokens=16)
    r = p2(engine, texts, tasks, 3, 32)
    empty = sum(1 for a in answers if a is None or not a.text.strip())
    return empty == 0, (f"16 prompts over {len(TASKS)} adapters, 32 new tokens: mixed batch {r['mixed']:.0f} tok/s, "
                        f"one adapter {r['one']:.0f} tok/s (ratio {r['mixed'] / r['one']:.2f}), task by task "
                        f"{r['by_task']:.0f} tok/s; {empty} empty answers")


def serve_http(lib):
    import httpx
    from serve_memory import ask

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("chainlora")
    server = subprocess.Popen([str(exe), "serve", str(lib), "--port", str(port), "--device", device,
                               "--adapters", "pool", "--max-adapters", "8"], stdout=subprocess.DEVNULL,
                              stderr=open(out / "serve.log", "w"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                return False, f"server did not come up (exit {server.poll()}; see {out}/serve.log)"
            time.sleep(0.5)
        names = [t for t in TASKS for _ in range(16)]
        t0 = time.monotonic()
        errors = asyncio.run(ask(url, names, 16))
        seconds = time.monotonic() - t0
    finally:
        server.terminate()
        server.wait(timeout=30)
    return errors == 0, f"{len(names)} requests over {len(TASKS)} adapters, 16 at a time: {len(names) / seconds:.1f} req/s, {errors} errors"


check(f"bitsandbytes-{device}", bnb_cuda)
for model in models:
    name = Path(model).name
    check(f"gpu-memory-{name}", memory, model)
    if check(f"train-{name}", train, model):
        check(f"peft-load-{name}", peft_load, model)
        check(f"serve-pool-{name}", serve_pool, model)
if (out / f"lib-{Path(models[0]).name}" / "chainlora.json").is_file():
    check("serve-http-pool", serve_http, out / f"lib-{Path(models[0]).name}")
print(f"{'FAIL' if failed else 'PASS'} gpu-check {len(failed)} failed: {' '.join(failed) or '-'} "
      f"({device_name()}, torch {torch.__version__})", flush=True)
sys.exit(1 if failed else 0)
PYTHON
rc=$?
if [ "$rc" -eq 124 ]; then
  echo "FAIL gpu-check ran past BUDGET=${BUDGET}s (the checks above finished; see $OUT/stderr.log)"
  exit 1
fi
exit "$rc"
