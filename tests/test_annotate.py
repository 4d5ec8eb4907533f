"""Human evaluation round trip over files: blind export, filled sheets from three annotators,
import with per-system rates and agreement; the kappa formulas against textbook examples."""

from __future__ import annotations

import csv
import json

import pytest

from chainlora.eval import annotate


def test_cohen_kappa_textbook_example():
    # 50 items: both Yes 20, A yes / B no 5, A no / B yes 10, both No 15 -> kappa 0.4
    a = ["Pass"] * 25 + ["Fail"] * 25
    b = ["Pass"] * 20 + ["Fail"] * 5 + ["Pass"] * 10 + ["Fail"] * 15
    assert annotate.cohen_kappa(a, b) == pytest.approx(0.4)
    assert annotate.cohen_kappa(a, a) == 1.0


def test_fleiss_kappa_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories -> 0.210
    table = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
             [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]
    assert annotate.fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    with pytest.raises(ValueError):
        annotate.fleiss_kappa([[1, 1, 0], [2, 1, 0]])


def fill(sheet: str, out, annotator: str, rate) -> None:
    rows = list(csv.DictReader(open(sheet, encoding="utf-8")))
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, row in enumerate(rows):
            w.writerow({**row, "rating": rate(row["item_id"], i), "annotator": annotator})


@pytest.mark.slow
def test_annotate_round_trip(random_lib, tmp_path, cli):
    out = tmp_path / "sheets"
    r = cli("annotate", "export", str(random_lib), "--data", "demo", "--per-task", "2", "--out", str(out),
            "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    key = json.loads((out / "key.json").read_text())["items"]
    rows = list(csv.DictReader(open(out / "sheet.csv", encoding="utf-8")))
    assert len(rows) == len(key) == 30 and set(rows[0]) == set(annotate.SHEET_FIELDS)
    assert {v["system"] for v in key.values()} == {"chain", "mixed", "base"}
    systems_in_order = [key[row["item_id"]]["system"] for row in rows]
    assert systems_in_order != sorted(systems_in_order)  # shuffled: order does not give systems away
    page = (out / "sheet.html").read_text()
    assert "Download CSV" in page and all(rt in page for rt in annotate.RATINGS)
    assert '"system"' not in page and "adapter" not in page  # blind
    export_id = json.loads((out / "key.json").read_text())["export"]
    assert all(item.startswith(export_id + "-") for item in key)  # ids unique to this export
    # A always follows the system: chain Excellent, mixed Pass, base Fail; B agrees except on the
    # first 6 rows (Pass); C rates only the first 10 rows, like A.
    truth = {"chain": "Excellent", "mixed": "Pass", "base": "Fail"}
    fill(out / "sheet.csv", tmp_path / "a.csv", "ann-a", lambda item, i: truth[key[item]["system"]])
    fill(out / "sheet.csv", tmp_path / "b.csv", "ann-b", lambda item, i: "pass" if i < 6 else truth[key[item]["system"]])
    fill(out / "sheet.csv", tmp_path / "c.csv", "", lambda item, i: truth[key[item]["system"]] if i < 10 else "")
    r = cli("annotate", "import", str(out), str(tmp_path / "a.csv"), str(tmp_path / "b.csv"),
            str(tmp_path / "c.csv"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["annotators"] == ["ann-a", "ann-b", "c"]  # an unnamed sheet is named after its file
    routed = res["systems"]["chain"]
    first6 = [key[row["item_id"]]["system"] for row in rows[:6]]
    first10 = [key[row["item_id"]]["system"] for row in rows[:10]]
    assert routed["n"] == 10 + 10 + first10.count("chain")
    assert routed["Excellent"] == routed["n"] - first6.count("chain") and routed["Fail"] == 0
    assert res["systems"]["base"]["fail_rate"] == pytest.approx(
        1 - first6.count("base") / res["systems"]["base"]["n"])
    ab = res["cohen_kappa"]["ann-a / ann-b"]
    a_r = [truth[s] for s in systems_in_order]
    b_r = ["Pass"] * 6 + a_r[6:]
    assert ab["items"] == 30 and ab["cohen_kappa"] == pytest.approx(annotate.cohen_kappa(a_r, b_r))
    assert res["cohen_kappa"]["ann-a / c"]["cohen_kappa"] == 1.0
    assert res["fleiss_items"] == 10 and res["fleiss_kappa"] < 1.0
    assert json.loads((out / "results.json").read_text())["annotators"] == res["annotators"]
    bad = tmp_path / "bad.csv"
    bad.write_text("item_id,rating\n" + rows[0]["item_id"] + ",Great\n")
    r = cli("annotate", "import", str(out), str(bad))
    assert r.returncode == 2 and "bad.csv:2: rating 'Great'" in r.stderr
    bad.write_text("item_id,rating\nnot-an-item,Pass\n")
    r = cli("annotate", "import", str(out), str(bad))
    assert r.returncode == 2 and "bad.csv:2: item_id 'not-an-item' is not in this export" in r.stderr
