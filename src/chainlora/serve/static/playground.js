// The playground: chat with the library, one model or chain / mixed / base side by side, and see
// beside each answer which adapter answered it and why (the `chainlora` field of every chunk).
import { Failure, getJSON, storeKey, storedKey, streamChat } from "./api.js";
import { perplexityOf, renderLibrary } from "./library.js";
import { AnswerCard, el, noticeMessage, userMessage } from "./render.js";

const $ = (id) => document.getElementById(id);
const COMPARED = ["chain", "mixed", "base"];
const state = { models: [], library: null, history: [], running: new Set() };

function labelOf(m) {
  return m === "chain" ? "chain (routed)" : m === "mixed" ? "mixed adapter" : m === "base"
    ? "base model (no adapter)" : `${m} (pinned)`;
}

function notice(text) {
  $("notice").textContent = text;
  $("notice").hidden = !text;
}

function scroll(force = false) {
  const chat = $("chat");
  if (force || chat.scrollHeight - chat.scrollTop - chat.clientHeight < 160) chat.scrollTop = chat.scrollHeight;
}

function number(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) && $(id).value !== "" ? v : fallback;
}

// ------------------------------------------------------------------ the key

function askKey(message = "") {
  $("key-button").hidden = false;
  $("key-error").textContent = message;
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key").focus();
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("key").value.trim();
  if (!key) {
    $("key-error").textContent = "Enter the server's key.";
    return;
  }
  $("key-submit").disabled = true;
  $("key-error").textContent = "checking…";
  try {
    await getJSON("v1/models", key);
  } catch (e) {
    $("key-error").textContent = e.status === 401 ? "Wrong key: the server refused it (401). Try again."
      : `The key could not be checked: ${e.message}`;
    return;
  } finally {
    $("key-submit").disabled = false;
  }
  storeKey(key);
  $("key").value = "";
  $("key-error").textContent = "";
  $("key-dialog").close();
  await start();
}

// ------------------------------------------------------------------ models and library

async function loadModels() {
  const body = await getJSON("v1/models");
  state.models = (body.data || []).map((m) => m.id);
  const select = $("model");
  const was = select.value;
  select.replaceChildren(...state.models.map((m) => el("option", { value: m, text: labelOf(m) })));
  select.value = state.models.includes(was) ? was : state.models[0];
  select.disabled = $("compare").checked;
}

async function loadLibrary() {
  try {
    state.library = await getJSON("v1/library");
    renderLibrary(state.library);
  } catch (e) {
    $("library-summary").textContent = `The library could not be read: ${e.message}`;
    if (e.status === 401) askKey("The server asked for its API key (401).");
  }
}

async function start() {
  try {
    await loadModels();
    notice("");
  } catch (e) {
    if (e.status === 401) {
      const had = storedKey();
      storeKey("");
      askKey(had ? "The key kept in this tab was refused (401). Enter the current one." : "");
    } else {
      notice(`The server's models could not be read: ${e.message}. Messages are still sent to "chain".`);
    }
    return;
  }
  await loadLibrary();
}

// ------------------------------------------------------------------ asking

function busy() {
  $("stop").hidden = state.running.size === 0;
}

async function answer(model, messages, card) {
  const controller = new AbortController();
  state.running.add(controller);
  busy();
  const t = { start: performance.now(), first: null, last: null, end: null, tokens: 0 };
  let text = "";
  let usage = null;
  let routed = false;
  const body = { model, messages, max_tokens: number("max-tokens", 128), temperature: number("temperature", 0) };
  try {
    await streamChat(body, (chunk) => {
      if (chunk.chainlora && !routed) {
        routed = true;
        card.route(chunk.chainlora, state.library ? state.library.threshold : null);
        if (state.library) card.perplexity(perplexityOf(state.library, chunk.chainlora));
        card.status("streaming…");
      }
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && !delta.role && typeof delta.content === "string") {  // a token's text (the role chunk aside)
        const piece = delta.content;
        const now = performance.now();
        if (t.first === null) t.first = now;
        t.last = now;
        t.tokens += 1;
        text += piece;
        card.append(piece);
        card.timings({ ...t, end: now });
        scroll();
      }
    }, controller.signal);
    t.end = performance.now();
    if (usage && typeof usage.completion_tokens === "number") t.tokens = usage.completion_tokens;
    card.timings(t);
    if (!text) card.empty();
    card.status(`done in ${((t.end - t.start) / 1000).toFixed(2)} s`);
    return text;
  } catch (e) {
    const failure = e instanceof Failure ? e : new Failure("bug", `the page failed: ${e && e.message}`);
    card.fail(failure.kind === "aborted" ? "Stopped before the answer was complete." : failure.message);
    if (failure.status === 401) askKey("The server asked for its API key (401). Enter it, then send the message again.");
    return null;
  } finally {
    state.running.delete(controller);
    busy();
    scroll();
  }
}

function send() {
  const text = $("prompt").value;
  if (!text.trim()) return;
  $("prompt").value = "";
  $("empty").hidden = true;
  const compare = $("compare").checked;
  const available = state.models.length ? state.models : ["chain"];
  const models = compare ? COMPARED.filter((m) => available.includes(m)) : [$("model").value || "chain"];
  const turn = { role: "user", content: text };
  const messages = !compare && $("history").checked ? [...state.history, turn] : [turn];
  const cards = models.map((m) => new AnswerCard(m));
  $("log").append(userMessage(text), compare ? el("div", { className: "compare", "data-columns": cards.length },
    ...cards.map((c) => c.node)) : cards[0].node);
  scroll(true);
  const runs = models.map((m, i) => answer(m, messages, cards[i]));
  if (!compare) {
    runs[0].then((reply) => {
      if (reply !== null) state.history.push(turn, { role: "assistant", content: reply });
    });
  }
}

// ------------------------------------------------------------------ wiring

function toggleLibrary() {
  const panel = $("library");
  panel.hidden = !panel.hidden;
  $("library-toggle").setAttribute("aria-expanded", String(!panel.hidden));
  if (!panel.hidden) loadLibrary();
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => state.running.forEach((c) => c.abort()));
  $("compare").addEventListener("change", () => { $("model").disabled = $("compare").checked || !state.models.length; });
  $("library-toggle").addEventListener("click", toggleLibrary);
  $("library-refresh").addEventListener("click", () => { loadModels().catch(() => {}); loadLibrary(); });
  $("key-form").addEventListener("submit", submitKey);
  $("key-button").addEventListener("click", () => askKey(""));
  $("clear").addEventListener("click", () => {
    $("log").replaceChildren();
    state.history = [];
    $("empty").hidden = false;
  });
  window.addEventListener("offline", () => {
    $("log").append(noticeMessage("The browser is offline: messages will fail until it is back.", "info"));
  });
}

wire();
start();
