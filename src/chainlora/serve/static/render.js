// Building the page's pieces. Text goes in with textContent / text nodes ONLY, never as HTML:
// user and model text cannot become markup (the page's Trusted Types policy would refuse it anyway).

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = String(v);
    else if (k === "className") node.className = v;
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

export const fmt = {
  pct: (p) => (typeof p === "number" ? `${(100 * p).toFixed(1)}%` : "—"),
  num: (x, d = 2) => (typeof x === "number" && Number.isFinite(x) ? x.toFixed(d) : "—"),
  bytes: (n) => (typeof n !== "number" ? "—" : n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KB`
    : `${(n / (1 << 20)).toFixed(1)} MB`),
  date: (iso) => (iso ? String(iso).slice(0, 10) : "—"),
};

const REASONS = {
  "no label": "the selector named no task",
  "low confidence": "confidence below the threshold",
  "out of library": "unlike every task in the library",
  gated: "the mixed adapter measured better on this task",
};

export function userMessage(text) {
  return el("div", { className: "msg user" }, el("div", { className: "text", text }));
}

export function noticeMessage(text, kind = "info") {
  return el("div", { className: `msg ${kind}`, role: kind === "error" ? "alert" : "status", text });
}

const FIELDS = [["task", "task"], ["adapter", "adapter"], ["selector", "selector"], ["confidence", "confidence"],
  ["top", "top 3"], ["fallback", "fallback"], ["ttft", "first token"], ["speed", "speed"], ["ppl", "test perplexity"]];

// One answer: its text as it streams, and beside it where it went and how fast it came.
export class AnswerCard {
  constructor(model) {
    this.text = el("div", { className: "text" });
    this.state = el("span", { className: "state", text: "waiting…" });
    this.values = {};
    const meta = el("dl", { className: "meta" });
    for (const [key, label] of FIELDS) {
      this.values[key] = el("dd", { "data-k": key, text: "—" });
      meta.append(el("div", { className: `row row-${key}` }, el("dt", { text: label }), this.values[key]));
    }
    this.node = el("article", { className: "answer", "data-model": model },
      el("header", {}, el("span", { className: "who", text: model }), this.state),
      el("div", { className: "body" }, this.text, meta));
  }

  set(key, value) { this.values[key].textContent = value; }

  append(text) { if (text) this.text.append(document.createTextNode(text)); }

  empty() { this.text.append(el("span", { className: "hint", text: "(no visible text in this answer)" })); }

  status(text) { this.state.textContent = text; }

  route(r, threshold) {
    if (!r) return;
    this.set("task", r.task ?? (r.selector === "pinned" ? "none (pinned)" : "none found"));
    this.set("adapter", r.adapter ?? "base model (no adapter)");
    this.set("selector", r.selector ?? "—");
    const t = r.selector !== "pinned" && threshold > 0 ? ` (threshold ${fmt.num(threshold, 3)})` : "";
    this.set("confidence", fmt.pct(r.probability) + t);
    const top = (r.top_k || []).slice(0, 3);
    this.values.top.replaceChildren(top.length ? el("ol", {}, ...top.map(([task, score]) =>
      el("li", { text: `${task} ${fmt.num(score, 3)}` }))) : document.createTextNode("—"));
    const why = REASONS[r.reason] || r.reason;
    const to = r.adapter ?? "base model";
    this.set("fallback", r.fallback ? `yes → ${to}${why ? ` (${why})` : ""}` : r.reason === "gated"
      ? `no; gated → ${to} (${why})` : "no");
    this.node.classList.toggle("fell-back", Boolean(r.fallback));
    if (typeof r.similarity === "number") this.values.fallback.title = `similarity to the library: ${r.similarity}`;
  }

  timings(t) {
    if (t.first !== null) this.set("ttft", `${Math.round(t.first - t.start)} ms`);
    const n = t.tokens;
    if (!n) return;
    const decode = n > 1 && t.last > t.first ? (n - 1) / ((t.last - t.first) / 1000) : n / ((t.end - t.start) / 1000);
    this.set("speed", `${fmt.num(decode, 1)} tokens/s (${n} token${n === 1 ? "" : "s"})`);
  }

  perplexity(p) { this.set("ppl", p ? `${fmt.num(p.value)} (${p.what})` : "not evaluated (chainlora eval)"); }

  fail(message) {
    this.node.classList.add("failed");
    this.status("failed");
    this.node.querySelector(".body").after(el("p", { className: "msg error", role: "alert", text: message }));
  }
}
