// The server's OpenAI-style API: JSON GETs and streaming POSTs (server-sent events), with the API key the
// user gave and the server's error messages turned into ApiError.

import { store } from "./dom.js";

export class ApiError extends Error {
  constructor(message, status = 0, code = null) { super(message); this.status = status; this.code = code; }
}

export const isAbort = (err) => err && err.name === "AbortError";

function requestHeaders(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = store.get("apiKey");
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function errorFrom(res) {
  let message = `${res.status} ${res.statusText}`.trim();
  let code = null;
  try {
    const body = await res.json();
    if (body && body.error && body.error.code) code = body.error.code;
    if (body && body.error && body.error.message) message = body.error.message;
    else if (body && typeof body.detail === "string") message = body.detail;
    else if (body && body.detail) message = JSON.stringify(body.detail);
  } catch { /* not JSON: keep the status line */ }
  if (res.status === 401) message += " (enter the server's API key under \u201cAPI key\u201d)";
  return new ApiError(message, res.status, code);
}

export async function getJSON(path) {
  const res = await fetch(path, { headers: requestHeaders(false) });
  if (!res.ok) throw await errorFrom(res);
  return res.json();
}

// One SSE event's data, or null for events without data (comments, keep-alives).
function eventData(raw) {
  const lines = [];
  for (const line of raw.split(/\r\n|\r|\n/)) {
    if (line.startsWith("data:")) lines.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return lines.length ? lines.join("\n") : null;
}

// Yields the data of each event. Network reads can end anywhere, even inside a UTF-8 character or
// between the two newlines that end an event, so bytes are decoded in streaming mode and only
// complete events (up to a blank line) leave the buffer.
async function* sseData(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
    let m;
    while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buf)) !== null) {
      const data = eventData(buf.slice(0, m.index));
      buf = buf.slice(m.index + m[0].length);
      if (data !== null) yield data;
    }
    if (done) break;
  }
  const rest = eventData(buf);
  if (rest !== null) yield rest;
}

// POST a streaming request; onOpen(response) runs once the server has accepted it (its headers are in),
// then onChoice(choice) for each chunk's first choice. Resolves with the last finish_reason; rejects with
// ApiError, or AbortError when stopped.
export async function streamPost(path, body, signal, onChoice, onOpen = () => {}) {
  const res = await fetch(path, {
    method: "POST", headers: requestHeaders(true), body: JSON.stringify(body), signal,
  });
  if (!res.ok) throw await errorFrom(res);
  onOpen(res);
  let finish = null;
  for await (const data of sseData(res)) {
    if (data.trim() === "[DONE]") return finish;
    let chunk;
    try { chunk = JSON.parse(data); } catch {
      throw new ApiError("The server sent data the page cannot read: " + data.slice(0, 80));
    }
    if (chunk.error) throw new ApiError(chunk.error.message || "Generation failed on the server.");
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    if (choice.finish_reason) finish = choice.finish_reason;
    onChoice(choice);
  }
  if (finish) return finish;
  throw new ApiError("The connection closed before generation finished.");
}
