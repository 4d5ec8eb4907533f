"""The command line: help, version, usage errors, and the demo on the real default model."""

from __future__ import annotations

import json
import re

import pytest

from chainlora import __version__
from chainlora.cli import main
from chainlora.data import DEMO_TASKS


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "invalid choice: 'frobnicate'" in err


def test_model_json_on_local_dir(tiny_model_dir, capsys):
    assert main(["model", str(tiny_model_dir), "--device", "cpu", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == 2 and info["chat_template"] is True and info["device"] == "cpu"


def test_data_json_on_demo(capsys):
    from chainlora.data import demo_path

    assert main(["data", str(demo_path("train")), "--test-file", str(demo_path("test")), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["task"] for r in rows) == sorted(DEMO_TASKS)


@pytest.mark.e2e
def test_demo_quick(tmp_path, default_base, cli):
    """The quick demo trains the whole chain on the real default model; adapters beat the base."""
    result = cli("demo", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "demo.json").read_text())
    assert len(report["test_loss"]) == 10
    for task, loss in report["test_loss"].items():
        assert loss["adapter"] < loss["base"], task
    assert report["mixed_test_loss"] > 0 and report["router_test_loss"] is None  # no router in the demo
    # the growth step: nine tasks first, then rhyme added; the trunk and nine adapters byte-identical
    growth = report["growth"]
    assert growth["task"] == "rhyme" and growth["kept"] == growth["of"] == 10
    assert growth["new_steps"] == 2 and growth["selectors"] == ["classifier", "encoder"]
    assert growth["mixed_steps"] > growth["new_steps"] and growth["seconds"] > 0
    assert "stage 1" in result.stdout and "10 keep, 2 train, 2 retrain" in result.stdout
    assert "10 of 10 trained adapters kept byte-identical" in result.stdout
    assert report["chain_vs_mixed"]["tasks"] == 10 and "chain vs mixed, paired over 10 tasks" in result.stdout
    assert len(report["answers"]) == 3 and all(a["chain"] and a["routed_to"] for a in report["answers"])
    selection = report["selection"]
    # every selector the demo config trains; the chain routes with the one `chainlora train` measured best
    assert set(selection) == {"classifier", "encoder"}
    assert report["selector"] in selection
    assert selection["classifier"]["top1"] >= 0.5  # MiniLM + linear head: far above chance (0.1)
    assert [r["task"] for r in report["perplexity"]] == sorted(report["test_loss"], key=list(report["test_loss"]).index)
    assert all(r["own"] < r["base"] for r in report["perplexity"])  # Table I: every adapter helps its task
    assert "Table I" in result.stdout and "Tables II/III" in result.stdout
    # piped, as in CI: every task name whole in every table, progress as whole lines (issue 42)
    for task in DEMO_TASKS:
        assert len(re.findall(rf"│ {task}\s", result.stdout)) >= 3, task  # data, losses, Table I, metrics
    assert "…" not in result.stdout and "\r" not in result.stderr and "\x1b[" not in result.stderr
    lib = tmp_path / "library-quick"
    assert (lib / "report.html").is_file() and (lib / "eval" / "demo.json").is_file()
    assert "Growth — rhyme added to the trained library" in (lib / "report.html").read_text()
    assert "report.html" in result.stdout
    again = cli("demo", "--quick", "--out", str(tmp_path))  # reuses the trained library
    assert again.returncode == 0 and "already trained" in again.stdout
    assert "(measured by the first run)" in again.stdout and "stage 1" not in again.stdout
