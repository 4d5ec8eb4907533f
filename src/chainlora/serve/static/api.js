// The server's API as the page uses it: relative URLs only (the page may sit behind a proxy
// under a path prefix), the key from session storage as `Authorization: Bearer`, and every
// failure turned into a Failure whose message the page can show as it is.

const KEY = "chainlora.apiKey";

export class Failure extends Error {
  // kind: "http" (an error response), "stream" (an error event), "connection", "aborted"
  constructor(kind, message, status = 0) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

export function storedKey() {
  try { return sessionStorage.getItem(KEY) || ""; } catch { return ""; }
}

export function storeKey(key) {
  try { if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY); } catch { /* private mode */ }
}

function headers(extra = {}, key = storedKey()) {
  const h = { Accept: "application/json", ...extra };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function failureOf(response) {
  let message = "";
  try {
    const body = await response.json();
    message = (body && body.error && body.error.message) || "";
  } catch { /* not JSON: the status says it */ }
  const text = `HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  return new Failure("http", message ? `${text}: ${message}` : text, response.status);
}

async function send(url, init) {
  try {
    return await fetch(url, { cache: "no-store", credentials: "omit", ...init });
  } catch (e) {
    if (e && e.name === "AbortError") throw new Failure("aborted", "stopped");
    throw new Failure("connection", "connection lost: the server could not be reached");
  }
}

export async function getJSON(url, key) {
  const response = await send(url, { headers: headers({}, key) });
  if (!response.ok) throw await failureOf(response);
  try { return await response.json(); } catch { throw new Failure("http", `${url}: the answer is not JSON`); }
}

// The data of each server-sent event, as it arrives.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
  }
}

// POST a streaming chat completion; `onChunk(chunk)` for every chunk, resolves at [DONE].
export async function streamChat(body, onChunk, signal) {
  const response = await send("v1/chat/completions", {
    method: "POST", signal, body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
  });
  if (!response.ok) throw await failureOf(response);
  try {
    for await (const data of events(response)) {
      if (data === "[DONE]") return;
      let chunk;
      try { chunk = JSON.parse(data); } catch { throw new Failure("stream", "the server sent an event that is not JSON"); }
      if (chunk && chunk.error) {
        throw new Failure("stream", `error while answering: ${chunk.error.message || "unknown error"}`);
      }
      onChunk(chunk);
    }
  } catch (e) {
    if (e instanceof Failure) throw e;
    if (e && e.name === "AbortError") throw new Failure("aborted", "stopped");
    throw new Failure("connection", "connection lost while the answer was streaming");
  }
  throw new Failure("connection", "connection lost: the stream ended before the answer was complete");
}
