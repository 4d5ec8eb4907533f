"""The playground: a page that talks to the library and shows which adapter answered, and why.

    GET /, /playground               the page (static/index.html): no key, no data in it
    GET /static/NAME                 its script modules, style sheet and icon (no key)
    GET /v1/library                  what the page shows of the library (the key, like /v1/*)
    GET /v1/library/report.html      `chainlora report`'s document, read-only (the key or a ticket)

The page is plain files shipped in the package (no build step, nothing from another origin) and
calls the server's own OpenAI endpoints with relative URLs, so it works behind a reverse proxy
under a path prefix. Its Content-Security-Policy (browser.py) allows only its own files, and its
script writes user and model text with `textContent` only. The Guard lets the page and its files
through without a key (they hold nothing); everything with data in it needs the key.

`/v1/library` is read from the live library (`server.engine.lib`: a reload changes it) and the
newest `LIB/eval/*.json` that `chainlora eval` wrote (Table I's perplexity per task, Table II's
selector accuracy), so every answer can show its adapter's measured test perplexity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest  # module level: FastAPI resolves annotations here
from fastapi.responses import HTMLResponse, Response

from chainlora.errors import ChainloraError
from chainlora.library import kinds, store
from chainlora.serve.browser import REPORT_POLICY, document_headers
from chainlora.serve.errors import ApiError
from chainlora.serve.guard import REPORT, report_ticket
from chainlora.serve.openapi import documented
from chainlora.serve.routes import relative

router = APIRouter()
PAGE = "index.html"
ASSETS = {"playground.js": "text/javascript", "api.js": "text/javascript", "render.js": "text/javascript",
          "library.js": "text/javascript", "playground.css": "text/css", "favicon.svg": "image/svg+xml"}
EVAL_KEYS = ("task", "n", "base", "own", "mixed", "chain", "arrow", "routed_right")  # a Table I row, as shown
SELECTION_KEYS = ("n", "top1", "top3", "heldout_top1", "accepted_top1", "fallback_rate", "threshold",
                  "ms_per_instruction")
REPORT_FILE = "report.html"  # where `chainlora report` writes it, in the library
JSON_OBJECT = {200: {"description": "the library as the playground shows it",
                     "content": {"application/json": {"schema": {"type": "object"}}}}}
HTML = {200: {"description": "the report (chainlora report)", "content": {"text/html": {"schema": {"type": "string"}}}}}


@functools.cache
def asset(name: str) -> bytes:
    """A file of chainlora/serve/static, read once."""
    return resources.files("chainlora.serve").joinpath("static", name).read_bytes()


@router.get("/", include_in_schema=False)
@router.get("/playground", include_in_schema=False)
async def page() -> Response:
    return Response(asset(PAGE), media_type="text/html; charset=utf-8", headers=document_headers())


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    if name not in ASSETS:
        raise ApiError(404, f"/static/{name[:100]}: no such file", code="not_found")
    charset = "; charset=utf-8" if ASSETS[name].startswith("text/") else ""
    return Response(asset(name), media_type=ASSETS[name] + charset, headers=document_headers())


@router.get("/v1/library", responses={**documented(401), **JSON_OBJECT}, response_model=None)
async def library(request: HttpRequest) -> dict:
    """The adapters, their evaluation and the selectors' accuracy, for the page's library panel."""
    return await asyncio.to_thread(describe, request.app.state.server)


@router.get(REPORT, response_class=HTMLResponse, responses={**documented(401, 404), **HTML}, response_model=None)
async def report(request: HttpRequest, ticket: str | None = None) -> Response:
    """The library's report.html, read-only; a browser link carries `ticket` (the Guard checks it)."""
    root = request.app.state.server.engine.lib.root
    path = root / REPORT_FILE
    try:
        text = await asyncio.to_thread(path.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ApiError(404, f"no {REPORT_FILE} in the library yet (run: chainlora report LIB)", code="not_found")
    return Response(relative(text, root), media_type="text/html; charset=utf-8",
                    headers=document_headers(REPORT_POLICY))


# --------------------------------------------------------------------------- the library, described


def describe(server: Any) -> dict:
    """What /v1/library answers (see the module docstring); nothing names the server's disk."""
    engine = server.engine
    lib = engine.lib
    m = lib.manifest
    ev = latest_eval(lib.root)
    rows = {r.get("task"): r for r in (ev or {}).get("perplexity", [])}
    base = str((m.get("base_model") or {}).get("name") or "")
    return {"object": "library", "base_model": Path(base).name if "/" in base or "\\" in base else base,
            "created": m.get("created"), "chainlora_version": m.get("chainlora_version"),
            "selector": engine.selector, "threshold": engine.threshold, "gated": sorted(engine.gated),
            "models": server.models(),
            "adapters": [adapter(lib, kind, entry, rows.get(entry.get("name")) if kind == "task" else None)
                         for kind, entry in entries(lib)],
            "selection": trained_selection(m.get("selection")), "eval": eval_summary(ev),
            "report": report_link(lib.root, server.api_key)}


def entries(lib: Any) -> list[tuple[str, dict]]:
    """(kind, entry) of everything the library holds: tasks, then trunk, router, mixed, selectors."""
    out = [("task", t) for t in lib.tasks]
    return out + [(k, lib.manifest[k]) for k in kinds.single_entries() if isinstance(lib.manifest.get(k), dict)]


def adapter(lib: Any, kind: str, entry: dict, row: dict | None) -> dict:
    """One entry as the panel shows it: size on disk, rank, branch mode, when its files were
    written (the date of its fingerprint), training facts, and its Table I row when evaluated."""
    try:
        where = lib.path(entry)
        files = [f for f in where.rglob("*") if f.is_file()]
    except (ChainloraError, KeyError, TypeError, OSError):  # a bad path: shown without its files' facts
        where, files = None, []
    weights = [f for f in files if f.suffix == ".safetensors"]
    written = max((f.stat().st_mtime for f in weights), default=None)
    branch = entry.get("branch") if isinstance(entry.get("branch"), dict) else {}
    cola = entry.get("cola") if isinstance(entry.get("cola"), dict) else {}
    fingerprint = entry.get("fingerprint") if isinstance(entry.get("fingerprint"), dict) else {}
    return {"name": entry.get("name", kind), "kind": kind, "label": entry.get("label"),
            "size_bytes": sum(f.stat().st_size for f in files), "rank": store.adapter_rank(where),
            "branch": branch.get("mode"), "cola_links": cola.get("links"),
            "trained": None if written is None else
            dt.datetime.fromtimestamp(written, dt.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": str(fingerprint.get("sha256") or "")[:12] or None,
            **{k: entry.get(k) for k in ("n_train", "steps", "train_loss", "test_loss", "base_test_loss")},
            "eval": None if row is None else {k: row.get(k) for k in EVAL_KEYS if k in row}}


def trained_selection(selection: Any) -> dict | None:
    """The selectors as `chainlora train` measured them on validation records (the manifest's)."""
    if not isinstance(selection, dict):
        return None
    selectors = selection.get("selectors") if isinstance(selection.get("selectors"), dict) else {}
    return {"winner": selection.get("winner"), "chosen_by": selection.get("chosen_by"),
            "selectors": {name: {k: v.get(k) for k in SELECTION_KEYS if k in v}
                          for name, v in selectors.items() if isinstance(v, dict)}}


def eval_summary(ev: dict | None) -> dict | None:
    """The newest evaluation without its answers and routes: Table I and the selectors' accuracy."""
    if ev is None:
        return None
    selection = ev.get("selection") if isinstance(ev.get("selection"), dict) else {}
    return {"file": ev.get("_file"), "created": ev.get("created"), "data": Path(str(ev.get("data") or "")).name,
            "n": ev.get("n"), "selector": ev.get("selector"), "chain_beats_mixed": ev.get("chain_beats_mixed"),
            "perplexity": [{k: r.get(k) for k in EVAL_KEYS if k in r} for r in ev.get("perplexity", [])
                           if isinstance(r, dict)],
            "perplexity_mean": ev.get("perplexity_mean"),
            "selection": {name: {k: v.get(k) for k in SELECTION_KEYS if k in v}
                          for name, v in selection.items() if isinstance(v, dict)}}


def latest_eval(root: Path) -> dict | None:
    """The newest LIB/eval/*.json with a perplexity table (judge results aside), as report.py picks it."""
    found = []
    for path in (root / "eval").glob("*.json"):
        try:
            stat = path.stat()
        except OSError:
            continue
        if not path.name.startswith("judge-"):
            found.append((stat.st_mtime_ns, path.name, stat.st_size, path))
    for mtime, name, size, path in sorted(found, reverse=True):
        data = _read_eval(str(path), mtime, size)
        if data is not None:
            return {**data, "_file": name}
    return None


@functools.lru_cache(maxsize=8)
def _read_eval(path: str, mtime_ns: int, size: int) -> dict | None:
    """One evaluation file, parsed once per version (its mtime and size are in the cache key)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("perplexity"), list):
        return None
    return {k: data.get(k) for k in ("created", "data", "n", "selector", "chain_beats_mixed", "perplexity",
                                     "perplexity_mean", "selection")}


def report_link(root: Path, api_key: str | None) -> str | None:
    """The report's URL relative to the page (a ticket in it when the server has a key), or None."""
    if not (root / REPORT_FILE).is_file():
        return None
    return REPORT.lstrip("/") + (f"?ticket={report_ticket(api_key)}" if api_key else "")
