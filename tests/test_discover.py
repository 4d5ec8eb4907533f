"""`chainlora discover`: features, the choice of k, names, the CLI's outputs and refusals, and
`tasks: auto` in a train config. The end-to-end tests use the bundled MiniLM encoder on a
slice of the demo's test records with their labels removed."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from chainlora.cli import main
from chainlora.data.records import demo_path, load_tasks
from chainlora.discover import cluster, names
from chainlora.data.content import mask_rare


def test_mask_rare_keeps_template_words_and_masks_the_filled_in_ones():
    texts = [f'What does the word "{w}" mean?' for w in ("cat", "dog", "sun", "sky", "car")] * 2
    masked = mask_rare(texts + ["Define tree."], 0.3)
    assert masked[0] == 'What does the word "X" mean?' and masked[-1] == "X X."


def _blobs(k: int, per: int, dim: int = 16, seed: int = 0) -> tuple:
    """k groups of `per` records each, answers drawn around k different means (plus noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    labels = np.repeat(np.arange(k), per)
    answers = centres[labels] + rng.normal(size=(k * per, dim))
    return centres, labels, answers


def test_separation_is_about_one_and_no_effect_within_a_task_and_large_between_tasks():
    _, labels, answers = _blobs(2, 400)
    significance, effect = cluster.separation(answers, labels, 2)
    assert significance > 50 and effect > 0.5
    one = answers[labels == 0]
    significance, effect = cluster.separation(one, np.arange(len(one)) % 2, 2)
    assert 0.2 < significance < 2.0 and abs(effect) < 0.01


def test_choose_k_finds_the_number_of_answer_distributions():
    centres, labels, answers = _blobs(4, 200)
    # 12 template groups, three per task; a group's point is its task's centre plus a template offset
    rng = np.random.default_rng(1)
    group_task = np.repeat(np.arange(4), 3)
    points = centres[group_task] + rng.normal(size=(12, centres.shape[1])) * 0.3
    group = np.concatenate([np.flatnonzero(group_task == t)[np.arange(200) % 3] for t in range(4)])
    choice = cluster.choose_k(points, np.bincount(group).astype(float), answers, group, 10, 0, progress=False)
    assert choice.partition.k == 4
    assert choice.scanned[4][0] >= cluster.SIGNIFICANCE and choice.scanned[4][1] >= cluster.EFFECT
    assert choice.scanned[5][0] < cluster.SIGNIFICANCE or choice.scanned[5][1] < cluster.EFFECT


def test_merge_small_moves_small_clusters_and_numbers_by_size():
    points = np.array([[0.0], [0.1], [5.0], [5.1], [9.0]])
    p = cluster.Partition(3, np.array([0, 0, 1, 1, 2]), np.array([[0.05], [5.05], [9.0]]), 3.0, 0.1)
    merged, moved = cluster.merge_small(p, points, np.array([5.0, 5.0, 6.0, 6.0, 1.0]), min_size=5)
    assert merged.k == 2 and moved == 1
    assert merged.group_labels.tolist() == [1, 1, 0, 0, 0]  # the 12-record cluster is first


def test_names_come_from_distinctive_instruction_words_and_are_unique():
    instructions = ["Translate this word into French."] * 5 + ["Give a synonym for this word."] * 5
    words = names.distinctive_words(instructions, [0] * 5 + [1] * 5, 2)
    assert "french" in words[0][:2] and "synonym" in words[1][:2] and "word" not in words[0][:2]
    assert names.names([["a1", "b1"], ["a1", "b1"], []]) == ["a1_b1", "a1_b1_2", "task_3"]


def _unlabelled(path, per_task: int = 40, seed: int = 3) -> list[str]:
    """The demo's test records, `per_task` a task, shuffled, task fields removed; returns the labels."""
    rows = [json.loads(line) for line in gzip.open(demo_path("test"), "rt")]
    by: dict = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r)
    rows = [r for rs in by.values() for r in rs[:per_task]]
    random.Random(seed).shuffle(rows)
    labels = [r.pop("task") for r in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return labels


@pytest.fixture(scope="module")
def discovered(tmp_path_factory):
    from sklearn.metrics import adjusted_rand_score

    root = tmp_path_factory.mktemp("discover")
    labels = _unlabelled(root / "data.jsonl", per_task=150)  # the whole test split: below ~100 a task k comes out low
    assert main(["discover", str(root / "data.jsonl"), "--out", str(root / "out")]) == 0
    found = [json.loads(line)["task"] for line in (root / "out" / "records.jsonl").read_text().splitlines()]
    return root, labels, found, adjusted_rand_score(labels, found)


@pytest.mark.slow
def test_discover_recovers_the_demo_tasks(discovered):
    _, labels, found, ari = discovered
    assert len(found) == len(labels) == 1500
    assert 9 <= len(set(found)) <= 11 and ari >= 0.9


def test_discover_writes_a_config_train_accepts(discovered):
    from chainlora.train import config

    root, _, found, _ = discovered
    cfg = config.load(root / "out" / "config.yaml")
    data = load_tasks(cfg.data.train, test_fraction=cfg.data.test_fraction)
    assert sorted(data) == sorted(set(found))
    page = (root / "out" / "clusters.html").read_text()
    assert "data:image/png;base64," in page and all(t in page for t in set(found))


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", ["empty", "one", "identical", "k_too_large", "bad_k"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    row = {"instruction": "Define the word.", "input": "cat", "output": "a small animal"}
    rows = {"empty": [], "one": [row], "identical": [{**row, "input": ""}] * 20,
            "k_too_large": [{**row, "input": f"w{i}"} for i in range(20)],
            "bad_k": [{**row, "input": f"w{i}"} for i in range(20)]}[case]
    data = _write(tmp_path / "d.jsonl", rows)
    extra = {"k_too_large": ["--k", "50"], "bad_k": ["--k", "many"]}.get(case, [])
    assert main(["discover", data, "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chainlora: error:")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_tasks_auto_discovers_inside_train_and_fingerprints_the_clustering(tmp_path):
    from chainlora.train import config
    from chainlora.train.plan import load_with_discovery

    _unlabelled(tmp_path / "a.jsonl", per_task=12)
    cfg = config.from_dict({"tasks": "auto", "data": {"train": str(tmp_path / "a.jsonl")},
                            "discover": {"min_size": 5}}, "cfg.yaml")
    data, found = load_with_discovery(cfg)
    assert found["k"] == len(data) >= 2 and len(found["assignments_sha256"]) == 64
    assert all(r.task == t for t, d in data.items() for r in d.train + d.test)
    _unlabelled(tmp_path / "a.jsonl", per_task=13)
    assert load_with_discovery(cfg)[1]["assignments_sha256"] != found["assignments_sha256"]
    with pytest.raises(Exception, match="discover.k"):
        config.from_dict({"tasks": "auto", "discover": {"k": 0}}, "cfg.yaml")


def test_one_template_is_one_task_not_an_error(tmp_path, capsys):
    rows = [{"instruction": "Define the word.", "input": f"word{i}", "output": f"meaning {i}"} for i in range(20)]
    assert main(["discover", _write(tmp_path / "d.jsonl", rows), "--out", str(tmp_path / "out")]) == 0
    found = {json.loads(line)["task"] for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()}
    assert len(found) == 1 and "no two clusters" in capsys.readouterr().out
