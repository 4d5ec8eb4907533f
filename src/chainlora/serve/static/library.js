// The library panel (GET v1/library) and what an answer looks up in it: the adapter's test
// perplexity from the newest `chainlora eval` (Table I).
import { el, fmt } from "./render.js";

const $ = (id) => document.getElementById(id);


function adapterRow(a) {
  const branch = a.branch ? a.branch + (a.cola_links ? ` · COLA ${a.cola_links}` : "")
    : a.cola_links ? `COLA ${a.cola_links} links` : "—";
  const ev = a.eval || {};
  const cells = [a.name, ...["own", "mixed", "chain", "base"].map((k) => fmt.num(ev[k])),
    typeof ev.routed_right === "number" ? fmt.pct(ev.routed_right) : "—",
    fmt.bytes(a.size_bytes), a.rank ?? "—", branch, fmt.date(a.trained), a.kind];
  const tr = el("tr", { "data-adapter": a.name }, ...cells.map((c) => el("td", { text: c })));
  tr.title = [a.trained && `files written ${a.trained}`, a.fingerprint && `fingerprint ${a.fingerprint}`,
    a.n_train != null && `${a.n_train} training records`, a.steps != null && `${a.steps} steps`,
    a.test_loss != null && `test loss ${a.test_loss}`].filter(Boolean).join(", ");
  return tr;
}

function selectorRows(lib) {
  const rows = [];
  const add = (name, where, s) => rows.push(el("tr", { "data-selector": name },
    ...[name, where, fmt.pct(s.top1), fmt.pct(s.top3), fmt.pct(s.heldout_top1), fmt.pct(s.fallback_rate)]
      .map((c) => el("td", { text: c }))));
  const ev = lib.eval;
  for (const [name, s] of Object.entries((ev && ev.selection) || {})) add(name, `eval ${ev.file || ""}`.trim(), s);
  const trained = lib.selection;
  for (const [name, s] of Object.entries((trained && trained.selectors) || {})) {
    add(name + (name === trained.winner ? " (chosen)" : ""), "validation (train)", s);
  }
  return rows;
}

export function renderLibrary(lib) {
  const ev = lib.eval;
  const parts = [`base model ${lib.base_model || "?"}`, `selector ${lib.selector ?? "none"}`,
    lib.threshold > 0 ? `threshold ${fmt.num(lib.threshold, 3)}` : null,
    !ev ? "no evaluation yet (chainlora eval LIB --data …)" : typeof ev.chain_beats_mixed !== "number"
      ? `evaluation ${ev.file}` : `evaluation ${ev.file}: chain beats mixed on ${ev.chain_beats_mixed} of ${ev.perplexity.length} tasks`,
    lib.gated && lib.gated.length ? `gated to mixed: ${lib.gated.join(", ")}` : null];
  $("library-summary").textContent = parts.filter(Boolean).join(" · ");
  const rows = lib.adapters.map(adapterRow);
  const mean = ev && ev.perplexity_mean;
  if (mean) {  // Table I's mean row, after the last task
    const last = lib.adapters.map((a) => a.kind).lastIndexOf("task");
    rows.splice(last + 1, 0, el("tr", { className: "mean" }, el("td", { text: "mean of the tasks" }),
      ...["own", "mixed", "chain", "base"].map((k) => el("td", { text: fmt.num(mean[k]) }))));
  }
  $("adapters").tBodies[0].replaceChildren(...rows);
  const sel = selectorRows(lib);
  $("selectors").tBodies[0].replaceChildren(...(sel.length ? sel
    : [el("tr", {}, el("td", { colspan: 6, text: "no selector measurements in this library" }))]));
  const line = $("report-line");
  if (lib.report) {
    line.replaceChildren("Report: ", el("a", { id: "report-link", href: lib.report, target: "_blank",
      rel: "noopener noreferrer", text: "report.html" }), " (read-only, opens in a new tab)");
  } else {
    line.textContent = "No report yet (chainlora report LIB writes one).";
  }
}

// {value, what} for the adapter that answered `route`, from the evaluation; null when none.
export function perplexityOf(lib, route) {
  const ev = lib && lib.eval;
  if (!ev || !route) return null;
  const rows = Object.fromEntries((ev.perplexity || []).map((r) => [r.task, r]));
  const a = route.adapter;
  if (a && rows[a] && typeof rows[a].own === "number") return { value: rows[a].own, what: `${a} test set` };
  const col = a === null || a === undefined ? "base" : a === "mixed" ? "mixed" : null;
  if (!col) return null;
  const row = rows[route.task];
  if (row && typeof row[col] === "number") return { value: row[col], what: `${col} on the ${route.task} test set` };
  const mean = ev.perplexity_mean;
  if (mean && typeof mean[col] === "number") return { value: mean[col], what: `${col}, mean of the tasks` };
  return null;
}
