"""A user's first hour (issue 42): each finding a new user hit, as the command that showed it.

The library here is trained the way that user trained theirs: their own CSV of four invented
tasks, a hash split, on a tiny model. Findings 10-11 (exports) are in test_export_reproduce.py.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import socket
from pathlib import Path

import pytest

from chainlora.cli import main

WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "silver", "forest", "candle",
         "mirror", "ocean", "paper", "thunder", "velvet", "winter", "bridge", "castle", "dragon", "eagle",
         "feather", "glacier", "harbor", "island", "jungle", "kettle", "lantern", "meadow", "needle", "orchid"]
TASKS = {"reverse": ("Reverse the letters of the word.", lambda w: w[::-1]),
         "upper": ("Write the word in capital letters.", str.upper),
         "count": ("How many letters are in the word?", lambda w: str(len(w))),
         "first_letter": ("What is the first letter of the word?", lambda w: w[0])}


def write_csv(path: Path, tasks=TASKS) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "instruction", "input", "output"])
        for word in WORDS:
            for task, (instruction, answer) in tasks.items():
                w.writerow([task, instruction, word, answer(word)])
    return path


def user_config(model_dir: Path, data: Path, out: Path, **extra: str) -> dict:
    cfg = {"base_model": str(model_dir), "data": {"train": str(data), "test_fraction": 0.25},
           "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
           "training": {"max_steps": 2, "batch_size": 4, "max_length": 48, "save_steps": 1000},
           "router": {"training": {"max_steps": 2}}, "classifier": {"enabled": False},
           "encoder": {"enabled": False}, "mixed": {"budget": "matched"}, "output_dir": str(out)}
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def user(tiny_model_dir, tmp_path_factory):
    """(folder, data4.csv, my.yaml, the library) as a new user would have them."""
    import yaml

    root = tmp_path_factory.mktemp("user")
    data = write_csv(root / "data4.csv")
    (root / "my.yaml").write_text(yaml.safe_dump(user_config(tiny_model_dir, data, root / "lib")))
    assert main(["train", str(root / "my.yaml")]) == 0
    return root, data, root / "my.yaml", root / "lib"


def eval_json(lib: Path, data: Path, *extra: str, capsys) -> tuple[int, dict | None, str]:
    rc = main(["eval", str(lib), "--data", str(data), "--no-generate", "--no-arrow", "--device", "cpu",
               "--json", *extra])
    out = capsys.readouterr()
    return rc, json.loads(out.out) if rc == 0 else None, out.err


# --------------------------------------------------------------------------- 1. training records


def test_1_eval_leaves_the_librarys_training_records_out(user, capsys):
    from chainlora.data.records import load_tasks

    root, data, _, lib = user
    split = load_tasks(data, test_fraction=0.25, seed=0)
    n_test, n_train = sum(len(d.test) for d in split.values()), sum(len(d.train) for d in split.values())
    assert (lib / "seen.json").is_file()
    rc, result, err = eval_json(lib, data, capsys=capsys)
    assert rc == 0 and result["n"] == n_test
    assert f"left out {n_train} training records of this library" in err and "--include-train" in err
    assert result["records"]["training_records_left_out"] == n_train
    rc, result, err = eval_json(lib, data, "--include-train", capsys=capsys)
    assert rc == 0 and result["n"] == n_test + n_train
    assert f"warning: {n_train} of the scored records were training records" in err
    assert result["records"]["training_records_scored"] == n_train


def test_1_a_library_without_seen_json_is_checked_against_its_recorded_data(user, tmp_path, capsys):
    root, data, _, lib = user
    old = tmp_path / "old"
    shutil.copytree(lib, old)
    (old / "seen.json").unlink()  # a library trained before seen.json existed
    rc, result, err = eval_json(old, data, capsys=capsys)
    assert rc == 0 and "left out" in err and "its recorded config's data" in err
    moved = tmp_path / "moved.csv"  # its training file is gone: said, never guessed
    manifest = json.loads((old / "chainlora.json").read_text())
    manifest["training"]["data"]["train"] = str(tmp_path / "gone.csv")
    (old / "chainlora.json").write_text(json.dumps(manifest))
    shutil.copy(data, moved)
    rc, result, err = eval_json(old, moved, capsys=capsys)
    assert rc == 0 and "records it trained on cannot be told apart" in err


def test_1_a_file_of_training_records_only_is_an_error_naming_the_way_out(user, tmp_path, capsys):
    from chainlora.data.records import load_tasks

    root, data, _, lib = user
    train = [r for d in load_tasks(data, test_fraction=0.25, seed=0).values() for r in d.train]
    path = tmp_path / "train-only.jsonl"
    path.write_text("".join(json.dumps({"task": r.task, "instruction": r.instruction, "input": r.input,
                                        "output": r.output}) + "\n" for r in train))
    rc, _, err = eval_json(lib, path, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "were its training records" in err and "--include-train" in err


# --------------------------------------------------------------------------- 2. overwritten folders


def test_2_discover_refuses_a_folder_of_the_users_and_keeps_their_files(tmp_path, capsys):
    mine = tmp_path / "myproj"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own config\n")
    (mine / "records.jsonl").write_text('{"my": "records"}\n')
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}.", "output": w}) + "\n" for w in WORDS))
    assert main(["discover", str(data), "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists and is not a `chainlora discover` directory" in err
    assert (mine / "config.yaml").read_text() == "my own config\n"
    assert (mine / "records.jsonl").read_text() == '{"my": "records"}\n'


def test_2_discover_reruns_over_its_own_folder_but_never_over_an_edit(tmp_path, capsys):
    rows = [{"instruction": "Define the word.", "input": w, "output": f"a {w}"} for w in WORDS]
    rows += [{"instruction": "Spell the word backwards.", "input": w, "output": w[::-1]} for w in WORDS]
    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert main(["discover", str(data), "--out", str(out), "--k", "2"]) == 0
    assert json.loads((out / "discover.json").read_text())["files"].keys() == {
        "records.jsonl", "config.yaml", "clusters.html"}
    assert main(["discover", str(data), "--out", str(out), "--k", "2"]) == 0  # its own folder: fine
    edited = (out / "records.jsonl").read_text().replace('"task": "', '"task": "my_')
    (out / "records.jsonl").write_text(edited)  # the user renamed the tasks
    capsys.readouterr()
    assert main(["discover", str(data), "--out", str(out), "--k", "2"]) == 2
    assert "records.jsonl: changed since chainlora wrote it" in capsys.readouterr().err
    assert (out / "records.jsonl").read_text() == edited


@pytest.mark.parametrize("command", ["train", "demo", "annotate", "export"])
def test_2_every_writing_command_refuses_a_folder_it_did_not_write(command, user, tmp_path, capsys):
    root, data, config_file, lib = user
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine\n")
    argv = {"train": ["train", str(config_file), "--out", str(mine)],
            "demo": ["demo", "--out", str(mine)],
            "annotate": ["annotate", "export", str(lib), "--data", str(data), "--out", str(mine)],
            "export": ["export", str(lib), "--format", "peft", "--out", str(mine)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{mine}: exists and is not" in err and "choose another" in err, err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine\n"


def test_2_annotate_never_overwrites_an_earlier_exports_key(user, tmp_path, capsys):
    root, data, _, lib = user
    out = tmp_path / "sheets"
    assert main(["annotate", "export", str(lib), "--data", str(data), "--per-task", "1", "--out", str(out),
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    key = (out / "key.json").read_text()
    capsys.readouterr()
    assert main(["annotate", "export", str(lib), "--data", str(data), "--out", str(out)]) == 2
    assert "holds an earlier export's key.json" in capsys.readouterr().err and (out / "key.json").read_text() == key


# --------------------------------------------------------------------------- 3. unknown task names


def test_3_eval_names_the_tasks_the_library_does_not_have(user, tmp_path, capsys):
    root, _, _, lib = user
    mixed = write_csv(tmp_path / "mixed.csv", {**{k: TASKS[k] for k in ("reverse", "upper")},
                                               "plural": ("Make it plural.", lambda w: w + "s"),
                                               "vowels": ("Count the vowels.", lambda w: "2")})
    rc, result, err = eval_json(lib, mixed, "--include-train", capsys=capsys)
    assert rc == 0 and result["tasks"] == ["reverse", "upper"]
    line = next(x for x in err.splitlines() if "does not have" in x)
    assert f"skipped {2 * len(WORDS)} records of tasks this library does not have: plural ({len(WORDS)}), " \
           f"vowels ({len(WORDS)})" in line
    none = write_csv(tmp_path / "none.csv", {"plural": ("Make it plural.", lambda w: w + "s")})
    rc, _, err = eval_json(lib, none, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "no records of this library's tasks" in err and "plural" in err


# --------------------------------------------------------------------------- 4. a chain that never routes


def _falls_back(lib: Path, dst: Path, rate: float) -> Path:
    shutil.copytree(lib, dst)
    m = json.loads((dst / "chainlora.json").read_text())
    m["selection"] = {"winner": "score", "selectors": {"score": {"threshold": 1.5, "fallback_rate": rate}}}
    (dst / "chainlora.json").write_text(json.dumps(m))
    return dst


def test_4_route_warns_when_the_default_routing_falls_back_and_says_why(random_lib, tmp_path, capsys):
    lib = _falls_back(random_lib, tmp_path / "lib", 1.0)
    assert main(["route", str(lib), "Give the antonym of hot.", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "warning: the default selector score sends 100% of validation requests to the mixed adapter" in out.err
    assert re.search(r"-> fallback mixed \(low confidence: [0-9.]+ < threshold 1\.500\)", out.out), out.out
    assert main(["route", str(lib), "Give the antonym of hot.", "--threshold", "0", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err  # the user chose the threshold: no warning about the default
    fine = _falls_back(random_lib, tmp_path / "fine", 0.1)
    assert main(["route", str(fine), "Give the antonym of hot.", "--device", "cpu"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_4_train_ends_with_the_warning(capsys):
    from chainlora.train.run import _print_selection

    sel = {"winner": "score", "selectors": {"score": {"top1": 0.3, "heldout_top1": None, "threshold": 1.0,
                                                      "fallback_rate": 1.0}}}
    _print_selection(sel, True)
    out = capsys.readouterr()
    assert "default: score" in out.out and "warning: the default selector score sends 100%" in out.err


# --------------------------------------------------------------------------- 5-7. errors before work


def test_5_serve_on_a_port_in_use_fails_before_loading_anything(user, cli):
    root, _, _, lib = user
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        r = cli("serve", str(lib), "--port", str(port), "--device", "cpu")
    finally:
        taken.close()
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--port {port}: cannot listen on 127.0.0.1:{port}" in r.stderr and "in use" in r.stderr
    assert "serving" not in r.stdout  # it said nothing about serving: it never loaded the model


def test_5_serve_on_a_host_that_does_not_resolve_is_one_line(user, cli):
    r = cli("serve", str(user[3]), "--host", "no-such-host.invalid", "--port", "0", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--host no-such-host.invalid" in r.stderr


def test_5_bind_refuses_a_port_it_already_holds():
    """serve() binds first and hands that very socket to uvicorn: the port is taken from then on."""
    from chainlora.errors import ChainloraError
    from chainlora.serve.connections import bind

    sock = bind("127.0.0.1", 0)
    try:
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(ChainloraError, match=f"--port {port}: cannot listen on 127.0.0.1:{port}"):
            bind("127.0.0.1", port)
    finally:
        sock.close()


@pytest.mark.parametrize("out", ["{data}/lib", "/proc/nope/lib"])
def test_6_train_checks_out_before_the_plan(out, user, capsys):
    root, data, config_file, _ = user
    assert main(["train", str(config_file), "--out", out.format(data=data)]) == 2
    got = capsys.readouterr()
    assert got.err.count("\n") == 1 and "nothing was changed" in got.err and "Traceback" not in got.err
    assert "plan for" not in got.out
    assert "is a file, not a directory" in got.err if "{data}" in out else "cannot create it in" in got.err


def test_7_one_error_prefix_and_a_file_named_as_a_file(user, capsys):
    root, data, _, lib = user
    assert main(["eval", str(lib), "--data", str(data), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err == "chainlora: error: eval: unrecognized arguments: --out x\n"
    assert main(["eval", str(lib)]) == 2
    assert capsys.readouterr().err.startswith("chainlora: error: eval: the following arguments are required")
    assert main(["route", str(data), "hi"]) == 2
    assert f"{data}: is a file, not a library directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- 8-9. logs


@pytest.mark.slow
def test_8_tables_in_a_log_keep_every_name_whole(tiny_model_dir, tmp_path, cli):
    import yaml

    long = {f"translate_{a}_to_{b}_" + "x" * 45: ("Translate.", str.upper) for a, b in (("en", "fr"), ("en", "es"))}
    data = write_csv(tmp_path / "long.csv", long)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(user_config(tiny_model_dir, data, tmp_path / "lib")))
    for r in (cli("data", str(data)), cli("train", str(tmp_path / "c.yaml"), "--set", "router.enabled=false")):
        assert r.returncode == 0, r.stderr[-2000:]  # stdout and stderr are pipes, as in CI
        for name in long:
            assert name in r.stdout + r.stderr, r.stdout + r.stderr
        assert "…" not in r.stdout + r.stderr


def test_8_demo_tables_piped_show_every_task_name_and_header_whole(capsys, monkeypatch):
    from chainlora.console import console
    from chainlora.data.records import DEMO_TASKS
    from chainlora.eval import tables

    monkeypatch.delenv("COLUMNS", raising=False)
    rows = [{"task": t, "n": 16, "tokens": 40, "base": 100.0, "own": 20.0, "mixed": 21.0, "chain": 20.5,
             "arrow": 30.0, "routed_right": 1.0} for t in DEMO_TASKS]
    result = {"perplexity": rows, "perplexity_mean": {"task": "mean", "base": 100.0, "own": 20.0, "mixed": 21.0,
                                                      "chain": 20.5, "arrow": 30.0},
              "chain_beats_mixed": 10, "arrow": {"skipped": "x"}, "selector": "encoder", "compute": {}}
    console().print(tables.perplexity(result))  # capsys: stdout is not a terminal
    out = capsys.readouterr().out
    for task in DEMO_TASKS:
        assert re.search(rf"│ {task}\s", out), task
    assert "…" not in out and "(zero-shot)" in out


@pytest.mark.slow
def test_8_progress_in_a_log_is_whole_lines(user, tmp_path, cli):
    root, _, config_file, _ = user
    r = cli("train", str(config_file), "--out", str(tmp_path / "lib"), "--set", "router.enabled=false",
            "--set", "encoder.enabled=true", "--set", "encoder.epochs=1")  # the encoder's own Trainer too
    assert r.returncode == 0, r.stderr[-2000:]
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr  # tqdm's redraws in a file
    assert "{'train_runtime'" not in r.stdout + r.stderr  # no Trainer metrics dicts in a log
    lines = [x for x in r.stderr.splitlines() if x.startswith("chainlora:") and "%" in x]
    assert lines and lines[-1].startswith("chainlora: 100%")
    r = cli("train", str(config_file), "--out", str(tmp_path / "lib2"), "--set", "router.enabled=false",
            "--progress", "none")
    assert r.returncode == 0 and not [x for x in r.stderr.splitlines() if "%" in x and "step" in x]


@pytest.mark.slow
def test_9_no_transformers_deprecation_in_route_output(random_lib, cli):
    r = cli("route", str(random_lib), "Give the antonym of hot.", "--device", "cpu")
    assert r.returncode == 0 and "deprecated" not in r.stdout + r.stderr, r.stderr


def test_9_summary_totals_count_only_this_runs_work():
    from types import SimpleNamespace

    from rich.console import Console

    from chainlora.train.progress import summary_table

    entry = lambda s: {"tokens": 100 * s, "seconds": float(s), "steps": s, "train_loss": 1.0}  # noqa: E731
    rows = [(SimpleNamespace(name="a", kind="task"), entry(50), "kept"),
            (SimpleNamespace(name="b", kind="task"), entry(3), None)]
    c = Console(width=200, record=True, file=open("/dev/null", "w"))
    c.print(summary_table(rows))
    total = next(x for x in c.export_text().splitlines() if "total" in x)
    assert "this run" in total and "1 not trained now" in total
    assert re.search(r"│\s+3 │\s+300 │\s+3\.0 │", total), total


# --------------------------------------------------------------------------- 12. the small ones


def test_12_export_help_lists_every_format(capsys):
    from chainlora.library.export import FORMATS

    from chainlora.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    help_ = next(c.help for c in sub._choices_actions if c.dest == "export")
    assert all(f in help_ for f in FORMATS), help_
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "gguf" in capsys.readouterr().out


def test_12_the_perplexity_legend_hides_no_bar():
    import matplotlib

    matplotlib.use("Agg")
    from chainlora.eval.report import perplexity_figure

    rows = [{"task": f"t{i}", "base": 10.0 ** (i % 3 + 1), "own": 9.0, "mixed": 8.0, "chain": 7.0} for i in range(10)]
    fig = perplexity_figure({"perplexity": rows})
    fig.canvas.draw()
    ax = fig.axes[0]
    legend, plot = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert legend.x0 >= plot.x1 or legend.y0 >= plot.y1  # beside or above the axes, never over the bars


def test_12_report_says_why_there_are_no_loss_curves(user):
    from chainlora.eval.report import build

    html_path, md_path = build(user[3])
    md = md_path.read_text()
    assert "training loss: no curves" in md and "training.logging_steps (10)" in md
