"""Incremental libraries: fingerprints decide what retrains; the old library serves until the
new one is complete; --force replaces only what chainlora wrote; bad input fails before a model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_S, TASKS, cfg_for, files, plan_lines, write_data

from chainlora import library
from chainlora.errors import ChainloraError
from chainlora.library import Library
from chainlora.train import config, train_library

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_data(d, TASKS + ["hypernym"])
    return d


@pytest.fixture(scope="module")
def base_lib(tiny_model_dir, data_dir, tmp_path_factory) -> Path:
    data = write_data(tmp_path_factory.mktemp("data3"), TASKS)
    return train_library(cfg_for(tiny_model_dir, data, TASKS), tmp_path_factory.mktemp("lib") / "lib")


def test_every_entry_records_its_fingerprint(base_lib):
    lib = Library.open(base_lib)
    for entry in lib.entries() + [lib.classifier]:
        fp = entry["fingerprint"]
        assert len(fp["sha256"]) == 64 and "training examples" in fp["parts"] and "base model" in fp["parts"]


def test_a_new_task_trains_it_and_its_dependants_only(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    (lib / "notes.txt").write_text("mine")  # a user's file in the library travels with it
    (lib / "eval").mkdir()
    (lib / "eval" / "old.json").write_text("{}")
    before = files(lib)
    data = write_data(tmp_path, TASKS + ["hypernym"])
    cfg = cfg_for(tiny_model_dir, data, TASKS + ["hypernym"])
    train_library(cfg, lib, dry_run=True)
    plan = plan_lines(capsys.readouterr().out)
    assert files(lib) == before and not (tmp_path / ".lib.partial").exists()  # dry run: no change
    assert {k: a for k, (a, _) in plan.items()} == {
        "antonym": "keep", "sentiment": "keep", "rhyme": "keep", "hypernym": "train",
        "(router)": "retrain", "(classifier)": "retrain", "(mixed)": "retrain"}
    assert "training examples" in plan["(router)"][1] and plan["hypernym"][1] == "new"

    train_library(cfg, lib)
    after = files(lib)
    for t in TASKS:  # byte-identical, never retrained
        path = f"tasks/{t}/adapter_model.safetensors"
        assert after[path] == before[path], t
    assert "tasks/hypernym/adapter_model.safetensors" in after
    for name in ("router", "mixed", "classifier"):
        key = next(k for k in after if k.startswith(name + "/"))
        assert after[key] != before[key], name
    opened = Library.open(lib)
    assert opened.task_names == TASKS + ["hypernym"] and opened.classifier["tasks"] == TASKS + ["hypernym"]
    assert (lib / "notes.txt").read_text() == "mine" and (lib / "eval/old.json").is_file()
    assert not (tmp_path / ".lib.partial").exists()

    # Same config and data again: nothing to do, nothing written.
    stamp = (lib / library.MANIFEST).stat().st_mtime_ns
    train_library(cfg, lib)
    assert "already trained with this config" in capsys.readouterr().out
    assert (lib / library.MANIFEST).stat().st_mtime_ns == stamp


def test_an_edited_record_retrains_that_task_and_its_dependants(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    before = files(lib)
    data = write_data(tmp_path, TASKS)
    rows = [json.loads(line) for line in data[0].read_text().splitlines()]
    rhyme = next(r for r in rows if r["task"] == "rhyme")
    rhyme["output"] = rhyme["output"] + "s"
    data[0].write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_library(cfg_for(tiny_model_dir, data, TASKS), lib)
    plan = plan_lines(capsys.readouterr().out)
    assert plan["rhyme"] == ("retrain", "changed: training examples")
    assert plan["antonym"][0] == plan["sentiment"][0] == "keep"
    assert plan["(mixed)"][0] == "retrain"  # its data holds the edited record
    # The selectors see instructions and labels only: an edited answer leaves them as they are.
    assert plan["(router)"][0] == plan["(classifier)"][0] == "keep"
    after = files(lib)
    for t in ("antonym", "sentiment"):
        assert after[f"tasks/{t}/adapter_model.safetensors"] == before[f"tasks/{t}/adapter_model.safetensors"]
    assert after["tasks/rhyme/adapter_model.safetensors"] != before["tasks/rhyme/adapter_model.safetensors"]
    Library.open(lib)


def test_a_dropped_task_is_removed_and_its_files_moved_aside(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    data = write_data(tmp_path, TASKS)
    train_library(cfg_for(tiny_model_dir, data, ["antonym", "rhyme"], "mixed.enabled=false"), lib)
    out = capsys.readouterr().out
    plan = plan_lines(out)
    assert plan["sentiment"][0] == "remove" and plan["(mixed)"][0] == "remove"
    assert "removed sentiment" in out and str(lib / "removed/tasks/sentiment") in out
    opened = Library.open(lib)
    assert opened.task_names == ["antonym", "rhyme"] and opened.mixed is None
    assert (lib / "removed/tasks/sentiment/adapter_model.safetensors").is_file()
    assert (lib / "removed/mixed/adapter_model.safetensors").is_file()
    assert not (lib / "tasks/sentiment").exists() and not (lib / "mixed").exists()


def test_a_config_key_that_decides_no_adapter_only_updates_the_manifest(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    before = files(lib)
    data = write_data(tmp_path, TASKS)
    train_library(cfg_for(tiny_model_dir, data, TASKS, "training.logging_steps=1"), lib)
    assert "every adapter is up to date" in capsys.readouterr().out
    assert files(lib) == before
    assert Library.open(lib).manifest["training"]["training"]["logging_steps"] == 1


def test_the_task_adapters_learning_rate_keeps_the_classifier(base_lib, tiny_model_dir, tmp_path, capsys):
    data = write_data(tmp_path, TASKS)

    def plan(*extra: str) -> dict:
        capsys.readouterr()
        train_library(cfg_for(tiny_model_dir, data, TASKS, *extra), base_lib, dry_run=True)
        return plan_lines(capsys.readouterr().out)

    tuned = plan("training.learning_rate=5.0e-3")
    assert tuned["antonym"] == ("retrain", "changed: training settings") and tuned["(classifier)"][0] == "keep"
    reseeded = plan("training.seed=7")["(classifier)"]  # the seed also draws the held-out records
    assert reseeded[0] == "retrain" and "training settings" in reseeded[1]
    assert plan("classifier.learning_rate=0.5")["(classifier)"] == ("retrain", "changed: classifier settings")


def test_the_encoder_fingerprint_holds_what_trains_it(tiny_model_dir, tmp_path):
    from chainlora.train import changes
    from chainlora.train.plan import load_data, plan_train

    data = write_data(tmp_path, TASKS)

    def print_of(*extra: str) -> str:
        cfg = cfg_for(tiny_model_dir, data, TASKS, "encoder.enabled=true", *extra)
        job = next(j for j in plan_train(cfg, load_data(cfg)).jobs if j.kind == "encoder")
        return changes.fingerprint(job, cfg, "sha256:x")["sha256"]

    same = print_of()
    assert print_of("training.learning_rate=5.0e-3") == print_of("training.max_steps=9") == same
    # its seed, its own section, and the linear probe its head starts from (classifier.*) retrain it
    others = {print_of("training.seed=7"), print_of("encoder.epochs=2"), print_of("classifier.learning_rate=0.5")}
    assert len(others | {same}) == 4


@pytest.mark.slow
def test_force_retrains_all_beside_the_old_library(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    (lib / "eval").mkdir()
    (lib / "eval" / "run.json").write_text("{}")
    (lib / "tasks/rhyme/NOTES.md").write_text("why rhyme")  # a user's note inside an adapter dir
    data = write_data(tmp_path, TASKS)
    train_library(cfg_for(tiny_model_dir, data, TASKS, "training.learning_rate=2e-3"), lib, force=True)
    plan = plan_lines(capsys.readouterr().out)
    assert len(plan) == 6 and all(a == "retrain" and r == "--force" for a, r in plan.values())
    opened = Library.open(lib)
    assert "forced" not in opened.manifest and opened.manifest["training"]["training"]["learning_rate"] == 2e-3
    assert (lib / "eval/run.json").is_file() and (lib / "tasks/rhyme/NOTES.md").read_text() == "why rhyme"
    assert not (tmp_path / ".lib.partial").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers


def test_a_corrupt_adapter_is_retrained(base_lib, tiny_model_dir, tmp_path, capsys):
    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    weights = lib / "classifier/head.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    train_library(cfg_for(tiny_model_dir, write_data(tmp_path, TASKS), TASKS), lib)
    plan = plan_lines(capsys.readouterr().out)
    assert plan["(classifier)"] == ("retrain", "files do not match the manifest (corrupt or edited)")
    assert sum(a == "keep" for a, _ in plan.values()) == 5
    Library.open(lib)


def test_out_dot_and_a_symlinked_library(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """`--out .` in an empty folder builds the library there (and grows it in place); a symlink
    to a library updates the directory it points to and stays a symlink."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    data = write_data(tmp_path, TASKS)
    cfg = cfg_for(tiny_model_dir, data, ["antonym"], "router.enabled=false", "mixed.enabled=false",
                  "classifier.enabled=false")
    assert train_library(cfg, ".") == here
    assert Library.open(here).task_names == ["antonym"]
    link = tmp_path / "current"
    link.symlink_to(here)
    cfg2 = cfg_for(tiny_model_dir, data, ["antonym", "rhyme"], "router.enabled=false",
                   "mixed.enabled=false", "classifier.enabled=false")
    train_library(cfg2, link)
    assert link.is_symlink() and Library.open(link).task_names == ["antonym", "rhyme"]
    assert Library.open(here).task_names == ["antonym", "rhyme"]
    assert "keep     antonym" in capsys.readouterr().out


def _kill_when(cmd: list[str], ready) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    deadline = time.monotonic() + HANG_S
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    assert proc.returncode == -9, "the run ended before it could be killed"


@pytest.mark.slow
def test_killed_force_run_leaves_the_old_library_serving(base_lib, tiny_model_dir, tmp_path):
    """SIGKILL a --force retrain mid-run: the old library still opens, verifies and routes; the
    interrupted run is refused without --resume and continued, still forced, with it."""
    from chainlora.inference.engine import Engine

    lib = tmp_path / "lib"
    shutil.copytree(base_lib, lib)
    before = files(lib)
    data = write_data(tmp_path, TASKS)
    sets = [f"base_model={tiny_model_dir}", f"data.train={data[0]}", f"data.test={data[1]}",
            f"tasks={json.dumps(TASKS)}", "training.save_steps=1"]  # save_steps decides no weights
    cmd = [sys.executable, "-m", "chainlora", "train", str(TINY), "--out", str(lib),
           *[a for s in sets for a in ("--set", s)]]
    partial = tmp_path / ".lib.partial"
    _kill_when(cmd + ["--force"],
               lambda: (partial / ".work/tasks-sentiment/checkpoint-1/trainer_state.json").exists())
    assert files(lib) == before
    engine = Engine.load(lib, device="cpu")  # verifies every hash
    assert engine.route(["Give the antonym of hot."])[0].task in TASKS

    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert refused.returncode == 2 and "--resume to continue" in refused.stderr
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = plan_lines(done.stdout)
    assert plan["antonym"] == ("keep", "finished by the interrupted run")
    assert plan["sentiment"] == ("retrain", "--force") and plan["(mixed)"] == ("retrain", "--force")
    opened = Library.open(lib)
    assert "forced" not in opened.manifest and not partial.exists()


@pytest.mark.slow
def test_no_training_records_fails_before_any_model(tiny_model_dir, tmp_path):
    """A task whose records are all in the test file: exit 2, one line, naming task and counts."""
    data = write_data(tmp_path, TASKS)
    extra = {"task": "hypernym", "instruction": "What is a dog a kind of?", "input": "", "output": "animal"}
    with data[1].open("a") as f:
        f.write(json.dumps(extra) + "\n")
    cmd = [sys.executable, "-m", "chainlora", "train", str(TINY), "--out", str(tmp_path / "lib"),
           "--set", "base_model=/nonexistent-model-dir", "--set", f"data.train={data[0]}",
           "--set", f"data.test={data[1]}", "--set", "tasks=all"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=HANG_S)
    assert result.returncode == 2, result.stderr[-2000:]
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert "hypernym" in line and "0 train, 1 in the test file" in line
    assert not (tmp_path / "lib").exists()


def test_warmup_ratio_is_a_ratio(tmp_path, monkeypatch):
    """warmup_ratio 0.5 of 10 steps warms up over 5 steps, 1.0 over all 10 (not one step)."""
    import torch
    from transformers import get_scheduler

    from chainlora.train.plan import Job
    from chainlora.train.arguments import training_args

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path))  # training_args sets it; undo after

    for ratio, warm in ((0.5, 5), (1.0, 10), (0.0, 0), (0.25, 3), (0.7, 7)):
        settings = config.TrainingSettings(warmup_ratio=ratio, max_steps=10, learning_rate=1e-3,
                                           lr_scheduler="linear")
        job = Job("task", "t", "tasks/t", [], [], settings, steps=10)
        args = training_args(job, tmp_path / "w", tmp_path / "logs")
        assert args.get_warmup_steps(10) == warm, ratio
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        sched = get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=args.get_warmup_steps(10),
                              num_training_steps=10)
        lrs = []
        for _ in range(3):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        if warm:
            assert lrs[0] == 0 and lrs[1] == pytest.approx(1e-3 / warm) and lrs[2] == pytest.approx(2e-3 / warm)
        else:
            assert lrs[0] == pytest.approx(1e-3)


def test_partial_library_without_manifest_is_never_deleted(tiny_model_dir, tmp_path):
    """A directory that merely has the partial name is not ours: --force refuses it."""
    partial = tmp_path / ".lib.partial"
    partial.mkdir()
    (partial / "keep.txt").write_text("x")
    data = write_data(tmp_path, TASKS)
    with pytest.raises(ChainloraError, match="not a partial chainlora library"):
        train_library(cfg_for(tiny_model_dir, data, TASKS), tmp_path / "lib", force=True)
    assert (partial / "keep.txt").is_file()


def test_library_files_follow_the_umask(base_lib):
    """Temporary files and directories are created private (0600 / 0700); what becomes the
    library must be readable as any other file the user writes (a server may run as another user)."""
    import stat

    old = os.umask(0o022)
    os.umask(old)
    if old != 0o022:
        pytest.skip(f"umask is {old:o}")
    for path in [base_lib / library.MANIFEST, base_lib / "tasks/antonym",
                 base_lib / "tasks/antonym/adapter_model.safetensors", base_lib / "classifier"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{path}: {mode:o}"
