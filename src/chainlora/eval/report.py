"""`chainlora report LIB`: one self-contained HTML page (plots embedded) and a Markdown twin.

Reads what the library already holds — the manifest (config, provenance, training-loss curves,
COLA knots) and LIB/eval/ (`chainlora eval`, `chainlora judge`) plus, optionally, human
ratings from `chainlora annotate import` — and draws: per-task perplexity as grouped bars
(log scale), the selector's confusion matrix, its confidence for right and wrong choices,
training-loss curves per adapter, and COLA adapters' curves with their knots; with `--sweep DIR`,
a chain-vs-mixed budget sweep's tables and its plot against budget (chainlora.eval.sweep). Nothing
is recomputed here: a report is cheap to rebuild after any of those commands.
"""

from __future__ import annotations

import base64
import functools
import html
import io
import json
import re
from pathlib import Path
from typing import Any

from chainlora import atomic
from chainlora.errors import ChainloraError
from chainlora.eval import sweep
from chainlora.eval.tables import SELECTION_HEADER, arrow_caption, gate_caption, paired, selection_rows
from chainlora.library.store import Library

SYSTEMS = (("base", "base (zero-shot)", "#9aa5b1"), ("own", "own adapter M_t", "#3b82f6"),
           ("mixed", "mixed", "#f59e0b"), ("chain", "chain (routed)", "#10b981"),
           ("arrow", "Arrow (PEFT)", "#a855f7"))


def _latest(root: Path, judge: bool, name: str | None = None) -> dict | None:
    """The named evaluation (LIB/eval/NAME.json), else the newest of its kind."""
    want = "summary" if judge else "perplexity"
    files = [p for p in (root / "eval").glob("*.json") if p.name.startswith("judge-") == judge]
    if name:
        files = [root / "eval" / (f"judge-{name}.json" if judge else f"{name}.json")]
        if not files[0].is_file():
            raise ChainloraError(f"{files[0]}: no such evaluation (run chainlora {'judge' if judge else 'eval'})")
    for path in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and want in data:
            data["_file"] = path.name
            return data
    return None


# --------------------------------------------------------------------------- plots


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def plot_perplexity(ev: dict) -> bytes:
    return _png(perplexity_figure(ev))


def outside_legend(ax, **kw) -> None:
    """The legend to the right of the axes: over the plot it hides the tallest bars or lines."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, **kw)


def perplexity_figure(ev: dict):
    import matplotlib.pyplot as plt

    rows = ev["perplexity"]
    systems = [s for s in SYSTEMS if all(s[0] in r and r[s[0]] is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 3.6))
    width = 0.8 / len(systems)
    for i, (key, label, color) in enumerate(systems):
        ax.bar([x + i * width for x in range(len(rows))], [r[key] for r in rows], width, label=label, color=color)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))], [r["task"] for r in rows], rotation=30, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("answer perplexity (log)")
    outside_legend(ax, fontsize=8)
    ax.set_title("Table I — perplexity per task")
    return fig


def plot_confusion(sel: dict) -> bytes:
    import matplotlib.pyplot as plt

    tasks = list(sel["confusion"])
    cols = list(next(iter(sel["confusion"].values())))
    grid = [[sel["confusion"][t][c] for c in cols] for t in tasks]
    fig, ax = plt.subplots(figsize=(0.55 * len(cols) + 3, 0.5 * len(tasks) + 2))
    im = ax.imshow(grid, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    top = max(max(row) for row in grid) or 1
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > top / 2 else "black")
    ax.set_xlabel("selected")
    ax.set_ylabel("true task")
    ax.set_title(f"confusion — {sel['selector']} selector")
    fig.colorbar(im, ax=ax, shrink=0.7)
    return _png(fig)


def plot_confidence(sel: dict) -> bytes:
    import matplotlib.pyplot as plt

    conf, right = sel["confidence"], sel["correct"]
    fig, ax = plt.subplots(figsize=(6, 3))
    bins = [i / 20 for i in range(21)]
    ax.hist([c for c, r in zip(conf, right) if r], bins=bins, alpha=0.75, label="right", color="#10b981")
    ax.hist([c for c, r in zip(conf, right) if not r], bins=bins, alpha=0.75, label="wrong", color="#ef4444")
    ax.set_xlabel("selector probability of its choice")
    ax.set_ylabel("instructions")
    ax.legend()
    ax.set_title(f"selector confidence — {sel['selector']}")
    return _png(fig)


def plot_losses(lib: Library) -> bytes | None:
    import matplotlib.pyplot as plt

    entries = [e for e in lib.entries() if e.get("loss_curve")]
    if not entries:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for e in entries:
        steps, losses = zip(*e["loss_curve"])
        style = "--" if e["name"] in ("router", "mixed") else "-"
        ax.plot(steps, losses, style, label=e["name"], lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (log)")
    outside_legend(ax, fontsize=7, ncol=1 + len(entries) // 16)
    ax.set_title("training loss per adapter")
    return _png(fig)


def plot_cola(lib: Library) -> bytes | None:
    import matplotlib.pyplot as plt

    chains = [e for e in lib.entries() if e.get("cola") and e.get("loss_curve")]
    if not chains:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for e in chains:
        steps, losses = zip(*e["loss_curve"])
        line, = ax.plot(steps, losses, label=f"{e['name']} (ranks {e['cola']['ranks']})")
        for k in e["cola"]["knots"]:
            ax.axvline(k, color=line.get_color(), alpha=0.3, lw=1, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (dotted: knots, where a link is merged)")
    ax.set_ylabel("training loss (log)")
    ax.legend(fontsize=7)
    ax.set_title("COLA residual chains")
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _f(x: Any, fmt: str = ".2f") -> str:
    return "—" if x is None else format(x, fmt)


def growth_table(g: dict) -> tuple[str, list[str], list[list[str]]]:
    """`chainlora demo`'s growth step (demo/growth.py): what adding a task cost the chain, and
    what one mixed adapter needs to learn it."""
    return (f"Growth — {g['task']} added to the trained library",
            ["how the new task is learnt", "optimizer steps", "examples", "seconds", "the other adapters"],
            [["chain: one more adapter + selectors retrained", str(g["new_steps"]), str(g["new_examples"]),
              f"{g['new_seconds'] + g['selector_seconds']:.1f}", f"{g['kept']} of {g['of']} byte-identical"],
             ["mixed: relearn all tasks from its start", str(g["mixed_steps"]), str(g["mixed_examples"]),
              f"{g['mixed_seconds']:.1f}", "all weights new"]])


def tables(lib: Library, ev: dict | None, jd: dict | None, human: dict | None) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table the data allows."""
    out = []
    if ev:
        keys = [s for s in SYSTEMS if s[0] in ev["perplexity_mean"]]
        rows = [[r["task"], *[_f(r.get(k)) for k, _, _ in keys], _f(r["routed_right"], ".0%")] for r in ev["perplexity"]]
        rows.append(["mean", *[_f(ev["perplexity_mean"][k]) for k, _, _ in keys], ""])
        note = (f" — chain < mixed on {ev['chain_beats_mixed']} of {len(ev['perplexity'])} tasks{arrow_caption(ev)}"
                f"{gate_caption(ev)}" if "mixed" in ev["perplexity_mean"] else "")
        out.append((f"Table I — answer perplexity per task (lower is better){note}",
                    ["task", *[label for _, label, _ in keys], "routed right"], rows))
        p = paired(ev)
        if p:
            out.append(("Chain vs mixed, paired by task (geometric-mean answer perplexity)",
                        ["tasks", "change", "± 1 SE", "chain ahead on", "beyond two SE"],
                        [[str(p["tasks"]), f"{p['change']:+.1%}", f"{p['se']:.1%}", str(p["wins"]),
                          "yes" if p["beyond_2se"] else "no"]]))
        out.append(("Tables II / III — task selection (* the default)", SELECTION_HEADER, selection_rows(ev)))
        if ev.get("growth"):
            out.append(growth_table(ev["growth"]))
        if "metrics" in ev:
            systems = list(next(iter(ev["metrics"].values())))
            out.append(("Task metrics — exact match / token F1 / chrF of greedy answers", ["task", *systems],
                        [[t, *[f"{_f(m[s]['exact_match'], '.0%')} / {_f(m[s]['token_f1'])} / {_f(m[s]['chrf'], '.1f')}"
                               for s in systems]] for t, m in ev["metrics"].items()]))
    if jd:
        out.append((f"Table IV — helpfulness 1-6 by {jd['judge']['model']}", ["system", "answers", "scored", "missing", "mean"],
                    [[s, str(v["n"]), str(v["scored"]), str(v["missing"]), _f(v["mean"])] for s, v in jd["summary"].items()]))
    if human:
        out.append((f"Table IV — human ratings ({len(human['annotators'])} annotators, Fleiss' kappa "
                    f"{_f(human.get('fleiss_kappa'), '.3f')})", ["system", "ratings", "Fail", "Pass", "Excellent"],
                    [[s, str(v["n"]), *[_f(v[f"{r}_rate"], ".0%") for r in ("fail", "pass", "excellent")]]
                     for s, v in human["systems"].items()]))
    adapters = [[e["name"], str(e.get("steps", "")), _f(e.get("train_loss"), ".3f"), _f(e.get("test_loss"), ".3f"),
                 _f(e.get("base_test_loss"), ".3f"), "COLA " + str(e["cola"]["ranks"]) if e.get("cola") else "LoRA"]
                for e in lib.entries()]
    out.append(("Adapters", ["adapter", "steps", "train loss", "test loss", "base test loss", "method"], adapters))
    return out


# --------------------------------------------------------------------------- the documents


def build(root: str | Path, human: str | Path | None = None, eval_name: str | None = None,
          sweeps: list[str | Path] = ()) -> tuple[Path, Path]:
    """Write LIB/report.html and LIB/report.md (+ LIB/report/*.png for the Markdown). `sweeps`:
    bench/chain_vs_mixed.py result directories whose budget tables and plot are added."""
    lib = Library.open(root, verify=False)
    root = lib.root
    ev, jd = _latest(root, judge=False, name=eval_name), _latest(root, judge=True)
    hu = None
    if human:
        try:
            hu = json.loads(Path(human).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ChainloraError(f"{human}: not a human-ratings results.json ({e.__class__.__name__})")
        if not isinstance(hu, dict) or not {"systems", "annotators"} <= set(hu):
            raise ChainloraError(f"{human}: not the results.json of `chainlora annotate import`")
    sel = ev["selection"].get(ev["selector"]) if ev else None
    plots = [("perplexity", "Perplexity per task", plot_perplexity(ev) if ev else None),
             ("confusion", "Confusion matrix", plot_confusion(sel) if sel else None),
             ("confidence", "Selector confidence", plot_confidence(sel) if sel and sel.get("confidence") else None),
             ("losses", "Training loss", plot_losses(lib)),
             ("cola", "COLA vs LoRA", plot_cola(lib))]
    plots = [p for p in plots if p[2]]
    tabs = tables(lib, ev, jd, hu)
    for i, directory in enumerate(sweeps):
        sweep_tabs, png, note = sweep.section(directory)
        tabs += [(f"{title} — {directory}" + (f". {note}" if j == 0 else ""), header, rows)
                 for j, (title, header, rows) in enumerate(sweep_tabs)]
        plots.append((f"sweep{i}", f"Chain vs mixed against budget — {directory}", png))
    m = lib.manifest
    prov = {"library": str(root), "base model": f"{m['base_model']['name']} ({m['base_model']['fingerprint'][:23]}…)",
            "chainlora": m.get("chainlora_version"), "created": m.get("created"),
            "config sha256": m.get("config_sha256", "")[:16], "evaluation": ev.get("_file") if ev else "none yet (chainlora eval)",
            "judge": jd.get("_file") if jd else "none", "system prompt": m.get("system_prompt")}
    if not any(key == "losses" for key, _, _ in plots):
        every = ((m.get("training") or {}).get("training") or {}).get("logging_steps", 10)
        prov["training loss"] = (f"no curves: an adapter logs its loss every training.logging_steps ({every}) "
                                 "optimizer steps, and none trained that long (lower logging_steps to see them)")
    config = json.dumps(m.get("training"), indent=2)
    html_doc = _html(lib, tabs, plots, prov, config)
    md = _markdown(tabs, plots, prov, config)
    (root / "report").mkdir(exist_ok=True)
    for key, _, png in plots:
        tmp = root / "report" / f".{key}.png.tmp"
        tmp.write_bytes(png)
        tmp.replace(root / "report" / f"{key}.png")
    return atomic.write_text(root / "report.html", html_doc), atomic.write_text(root / "report.md", md)


@functools.lru_cache(maxsize=1)
def _templates() -> Any:
    """The package's templates (chainlora/eval/templates), autoescaped: a report shows user
    text (task names, prompts, answers, paths), and the template must not be able to forget it."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("chainlora.eval", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def _html(lib: Library, tabs, plots, prov: dict, config: str) -> str:
    """report.html: templates/report.html.j2 filled in, plots embedded as base64 PNGs."""
    parts = [name for name, present in (("router", lib.router), ("mixed", lib.mixed),
                                        ("classifier", lib.classifier)) if present]
    figures = [(title, base64.b64encode(png).decode()) for _, title, png in plots]
    return _templates().get_template("report.html.j2").render(
        name=lib.root.name, root=str(lib.root), n_tasks=len(lib.tasks), parts=parts, tables=tabs,
        figures=figures, prov=prov, config=config)


def md_text(value: Any) -> str:
    """User text (task names, system prompt, answers) made inert in Markdown: HTML special
    characters as entities (a Markdown viewer renders raw HTML), newlines as spaces, and the
    characters that make links, images, code or table cells escaped."""
    text = html.escape(str(value), quote=False).replace("\r", " ").replace("\n", " ")
    return re.sub(r"([\\`\[\]|])", r"\\\1", text)


def _markdown(tabs, plots, prov: dict, config: str) -> str:
    lines = ["# chainlora report", ""]
    for title, header, rows in tabs:
        lines += [f"## {md_text(title)}", "", "| " + " | ".join(map(md_text, header)) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(map(md_text, r)) + " |" for r in rows] + [""]
    lines += ["## Plots", ""] + [f"![{md_text(title)}](report/{key}.png)" for key, title, _ in plots] + [""]
    lines += ["## Provenance", ""] + [f"- {md_text(k)}: {md_text(v)}" for k, v in prov.items()]
    fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", config)), default=0))
    lines += ["", "## Training config", "", fence + "json", config, fence, ""]  # a fence the config cannot close
    return "\n".join(lines)
