"""`chainlora annotate`: blind human evaluation, Fail / Pass / Excellent (Qiu et al. Table IV).

export: answers of the chain, the mixed adapter and the base model for the same instructions,
shuffled into one blind sheet — a CSV and a self-contained HTML page with Fail / Pass / Excellent
buttons that downloads the filled sheet as CSV — plus key.json, which says which system wrote
which item (keep it away from annotators).
import: filled sheets from several annotators; per-system Fail / Pass / Excellent rates and
inter-annotator agreement (Cohen's kappa per pair, Fleiss' kappa over items everyone rated).
"""

from __future__ import annotations

import csv
import io
import json
import random
import secrets
from itertools import combinations
from pathlib import Path
from typing import Any, Sequence

from chainlora import atomic
from chainlora.errors import ChainloraError

RATINGS = ("Fail", "Pass", "Excellent")
SHEET_FIELDS = ("item_id", "instruction", "reference", "answer", "rating", "annotator", "note")


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """A CSV cell a spreadsheet app will not run as a formula: a cell starting with = + - @,
    tab or CR gets the standard quote prefix (OWASP's CSV injection advice); the JavaScript
    download in sheet.html does the same (`cell`)."""
    return "'" + text if text.startswith(FORMULA_START) else text


def check_out(out: Path) -> None:
    """An export directory must be new or empty: an earlier export's key.json is the only way to
    unblind the sheets annotators already hold, so it is never overwritten."""
    atomic.check_out_dir(out, "key.json", "an annotation export")
    if (out / "key.json").exists():
        raise ChainloraError(f"{out}: holds an earlier export's key.json (its filled sheets need it); "
                             "nothing was changed (choose another --out)")


def export(engine: Any, records: Sequence[Any], out: Path, *, systems: Sequence[str] = ("chain", "mixed", "base"),
           seed: int = 0, max_new_tokens: int = 64) -> dict:
    """Write OUT/sheet.csv, OUT/sheet.html and OUT/key.json; return a summary."""
    from chainlora.eval.evaluate import system_answers

    rng = random.Random(seed)  # the order only; ids are random per export, so nothing can be unblinded
    export_id = secrets.token_hex(4)
    items, key = [], {}
    for system, answers in system_answers(engine, records, systems, max_new_tokens).items():
        for r, a in zip(records, answers):
            item_id = f"{export_id}-{secrets.token_hex(5)}"
            items.append({"item_id": item_id, "instruction": r.text, "reference": r.output, "answer": a.text})
            key[item_id] = {"system": system, "task": r.task, "adapter": a.route.adapter}
    rng.shuffle(items)  # systems interleaved: nothing in the order gives them away
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=SHEET_FIELDS)
    w.writeheader()
    for it in items:
        w.writerow({k: spreadsheet_safe(v) for k, v in {**it, "rating": "", "annotator": "", "note": ""}.items()})
    check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_text(out / "sheet.csv", buf.getvalue())
    atomic.write_text(out / "sheet.html", sheet_html(items, export_id))
    atomic.write_json(out / "key.json", {"export": export_id,
                                         "systems": list(dict.fromkeys(v["system"] for v in key.values())),
                                         "items": key})
    return {"items": len(items), "dir": str(out)}


def sheet_html(items: list[dict], export_id: str) -> str:
    """A self-contained rating page: buttons per item, progress kept in the browser, CSV download."""
    data = json.dumps([{k: it[k] for k in ("item_id", "instruction", "reference", "answer")} for it in items],
                      ensure_ascii=False).replace("<", "\\u003c")  # no tag can open inside the script
    return """<!doctype html><html><head><meta charset="utf-8"><title>chainlora rating sheet</title>
<style>body{font:15px system-ui,sans-serif;max-width:860px;margin:2em auto;color:#222}
.item{border:1px solid #ddd;border-radius:8px;padding:1em;margin:1em 0}.q{font-weight:600}
.ref{color:#666;font-size:13px}.a{background:#f6f8fa;padding:.6em;border-radius:6px;white-space:pre-wrap}
button{margin:.4em .4em 0 0;padding:.4em 1em;border-radius:6px;border:1px solid #aaa;background:#fff;cursor:pointer}
button.on{background:#2d6cdf;color:#fff;border-color:#2d6cdf}#bar{position:sticky;top:0;background:#fff;padding:.6em 0}
</style></head><body><h1>Rate each answer</h1>
<p>For each request, rate the answer: <b>Fail</b> (wrong or unusable), <b>Pass</b> (acceptable),
<b>Excellent</b> (correct and well put). The reference is one correct answer, not the only one.
Your ratings stay in this browser until you download them.</p>
<div id="bar">Your name: <input id="who" placeholder="annotator"> <span id="count"></span>
<button id="dl">Download CSV</button></div><div id="items"></div>
<script>
const ITEMS = """ + data + """;
const RATINGS = ["Fail", "Pass", "Excellent"];
const KEY = "chainlora-ratings-""" + export_id + """";  // one store per export
const store = JSON.parse(localStorage.getItem(KEY) || "{}");
const who = document.getElementById("who");
who.value = localStorage.getItem("chainlora-annotator") || "";
who.oninput = () => localStorage.setItem("chainlora-annotator", who.value);
function save() { localStorage.setItem(KEY, JSON.stringify(store)); count(); }
function count() { document.getElementById("count").textContent =
  Object.keys(store).length + " / " + ITEMS.length + " rated"; }
const box = document.getElementById("items");
ITEMS.forEach((it, i) => {
  const d = document.createElement("div"); d.className = "item";
  const t = (cls, s) => { const e = document.createElement("div"); e.className = cls; e.textContent = s; d.appendChild(e); };
  t("q", (i + 1) + ". " + it.instruction); t("ref", "reference: " + it.reference); t("a", it.answer || "(empty)");
  RATINGS.forEach(r => { const b = document.createElement("button"); b.textContent = r;
    if (store[it.item_id] === r) b.className = "on";
    b.onclick = () => { store[it.item_id] = r; d.querySelectorAll("button").forEach(x => x.className = "");
      b.className = "on"; save(); };
    d.appendChild(b); });
  box.appendChild(d); });
function cell(s) { s = String(s == null ? "" : s); if (/^[=+\\-@\\t\\r]/.test(s)) s = "'" + s; return /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }
document.getElementById("dl").onclick = () => {
  const rows = [["item_id", "instruction", "reference", "answer", "rating", "annotator", "note"]];
  ITEMS.forEach(it => rows.push([it.item_id, it.instruction, it.reference, it.answer, store[it.item_id] || "", who.value, ""]));
  const blob = new Blob([rows.map(r => r.map(cell).join(",")).join("\\n") + "\\n"], {type: "text/csv"});
  const a = document.createElement("a"); a.href = URL.createObjectURL(blob);
  a.download = "ratings-" + (who.value || "annotator") + ".csv"; a.click(); };
count();
</script></body></html>
"""


# --------------------------------------------------------------------------- import


def read_sheet(path: Path, known: set[str]) -> tuple[str, dict[str, str]]:
    """(annotator, {item_id: rating}) from a filled sheet; unrated rows are skipped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ChainloraError(f"{path}: cannot read sheet ({e})")
    try:
        return _read_rows(path, list(csv.DictReader(io.StringIO(text))), known)
    except csv.Error as e:
        raise ChainloraError(f"{path}: not a readable CSV sheet ({e})")


def _read_rows(path: Path, rows: list[dict], known: set[str]) -> tuple[str, dict[str, str]]:
    if not rows or "item_id" not in rows[0] or "rating" not in rows[0]:
        raise ChainloraError(f"{path}:1: needs columns item_id and rating (and at least one row)")
    annotator, ratings = "", {}
    for line, row in enumerate(rows, 2):
        item, rating = (row.get("item_id") or "").strip(), (row.get("rating") or "").strip()
        if not item and not rating:
            continue
        if item not in known:
            raise ChainloraError(f"{path}:{line}: item_id {item!r} is not in this export's key.json")
        if not rating:
            continue
        match = [r for r in RATINGS if r.lower() == rating.lower()]
        if not match:
            raise ChainloraError(f"{path}:{line}: rating {rating!r} (use {', '.join(RATINGS)})")
        ratings[item] = match[0]
        annotator = annotator or (row.get("annotator") or "").strip()
    return annotator or path.stem, ratings


def cohen_kappa(a: Sequence[str], b: Sequence[str]) -> float:
    """Cohen's kappa of two raters over the same items."""
    n = len(a)
    if n == 0:
        return float("nan")
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in RATINGS)
    return 1.0 if pe == 1 else (po - pe) / (1 - pe)


def fleiss_kappa(table: Sequence[Sequence[int]]) -> float:
    """Fleiss' kappa; table[i][j] = raters putting item i in category j (same count per item)."""
    if not table:
        return float("nan")
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("every item needs the same number (>= 2) of ratings")
    big_n = len(table)
    p_i = [(sum(x * x for x in row) - n) / (n * (n - 1)) for row in table]
    p_j = [sum(row[j] for row in table) / (big_n * n) for j in range(len(table[0]))]
    p_bar, pe = sum(p_i) / big_n, sum(p * p for p in p_j)
    return 1.0 if pe == 1 else (p_bar - pe) / (1 - pe)


def import_sheets(directory: Path, sheets: Sequence[Path]) -> dict:
    """Unblind the filled sheets with key.json; rates per system and agreement."""
    key_path = directory / "key.json"
    try:
        key = json.loads(key_path.read_text())["items"]
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ChainloraError(f"{key_path}: not an annotate export key ({e.__class__.__name__})")
    by_annotator: dict[str, dict[str, str]] = {}
    for sheet in sheets:
        name, ratings = read_sheet(Path(sheet), set(key))
        while name in by_annotator:  # two sheets by the same name stay two annotators
            name += "'"
        by_annotator[name] = ratings
    systems: dict[str, dict[str, Any]] = {}
    for ratings in by_annotator.values():
        for item, rating in ratings.items():
            s = systems.setdefault(key[item]["system"], {r: 0 for r in RATINGS})
            s[rating] += 1
    for s in systems.values():
        total = sum(s[r] for r in RATINGS)
        s.update(n=total, **{f"{r.lower()}_rate": s[r] / total if total else None for r in RATINGS})
    names = list(by_annotator)
    pairs = {}
    for x, y in combinations(names, 2):
        common = sorted(set(by_annotator[x]) & set(by_annotator[y]))
        pairs[f"{x} / {y}"] = {"items": len(common), "cohen_kappa": cohen_kappa(
            [by_annotator[x][i] for i in common], [by_annotator[y][i] for i in common])}
    everyone = sorted(set.intersection(*(set(r) for r in by_annotator.values()))) if names else []
    fleiss = (fleiss_kappa([[sum(by_annotator[a][i] == c for a in names) for c in RATINGS] for i in everyone])
              if len(names) >= 2 and everyone else None)
    return {"annotators": names, "items": len(key), "systems": systems, "cohen_kappa": pairs,
            "fleiss_kappa": fleiss, "fleiss_items": len(everyone)}
