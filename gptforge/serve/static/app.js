// gptforge web app: chat and token-inspecting completion against the server's OpenAI-style routes.
// Plain script, no framework or build step. Model output only ever reaches the page through
// textContent / text nodes, never innerHTML.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    info: null,
    messages: [],          // chat history: {role, content, box}
    start: 0,              // messages before this index no longer fit the context window
    controller: null,      // AbortController of the generation in flight (one at a time: one server slot)
    tokens: [],            // completion tokens: {text, p, top: [[token, p], ...], offset}
    lastText: "",          // prompt + completion text, for "Continue from output"
    pinned: -1,            // token whose alternatives stay open (click / focus), -1 for none
    modeChosen: false,     // the user (or URL) picked a mode: a model without chat does not override it
  };

  // --- sessionStorage (may be unavailable, e.g. some private modes) -------------------------------
  const store = {
    get(key, fallback = null) {
      try {
        const v = sessionStorage.getItem("gptforge." + key);
        return v === null ? fallback : JSON.parse(v);
      } catch { return fallback; }
    },
    set(key, value) {
      try {
        if (value === null || value === undefined) sessionStorage.removeItem("gptforge." + key);
        else sessionStorage.setItem("gptforge." + key, JSON.stringify(value));
      } catch { /* storage full or disabled: the page still works, it just forgets on reload */ }
    },
  };

  // --- error banner ------------------------------------------------------------------------------
  function showError(message) {
    $("error-text").textContent = message;
    $("error-banner").hidden = false;
  }
  function clearError() {
    $("error-banner").hidden = true;
    $("error-text").textContent = "";
  }

  // --- HTTP + server-sent events -----------------------------------------------------------------
  class ApiError extends Error {
    constructor(message, status = 0, code = null) { super(message); this.status = status; this.code = code; }
  }

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

  async function getJSON(path) {
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

  // POST a streaming request and call onChoice(choice) for each chunk's first choice.
  // Resolves with the last finish_reason; rejects with ApiError, or AbortError when stopped.
  async function streamPost(path, body, signal, onChoice) {
    const res = await fetch(path, {
      method: "POST", headers: requestHeaders(true), body: JSON.stringify(body), signal,
    });
    if (!res.ok) throw await errorFrom(res);
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

  const isAbort = (err) => err && err.name === "AbortError";

  // --- sampling settings -------------------------------------------------------------------------
  const SETTINGS = ["temperature", "top-p", "max-tokens", "seed", "stop", "top-k-shown"];

  function unescapeStop(s) {
    return s.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
  }

  function intField(id, label, min, max) {
    const el = $(id);
    const v = Number(el.value);
    if (!Number.isInteger(v) || v < min || (max !== undefined && v > max)) {
      el.focus();
      const range = max === undefined ? `at least ${min}` : `from ${min} to ${max}`;
      throw new ApiError(`${label} must be a whole number ${range}.`);
    }
    return v;
  }

  // Request fields shared by both modes; throws ApiError (shown in the banner) for bad input.
  function samplingParams() {
    const max = Number($("max-tokens").max) || undefined;
    const p = {
      temperature: Number($("temperature").value),
      top_p: Number($("top-p").value),
      max_tokens: intField("max-tokens", "Max new tokens", 1, max),
    };
    if ($("seed").value.trim() !== "") p.seed = intField("seed", "Seed", 0);
    const stops = $("stop").value.split("\n").filter((s) => s.length > 0).map(unescapeStop);
    if (stops.length) p.stop = stops;
    return p;
  }

  function showRangeValues() {
    $("temperature-value").textContent = Number($("temperature").value).toFixed(2);
    $("top-p-value").textContent = Number($("top-p").value).toFixed(2);
  }

  function initSettings() {
    for (const id of SETTINGS) {
      const saved = store.get("setting." + id);
      if (saved !== null) $(id).value = saved;
      $(id).addEventListener("change", () => store.set("setting." + id, $(id).value));
    }
    $("temperature").addEventListener("input", showRangeValues);
    $("top-p").addEventListener("input", showRangeValues);
    showRangeValues();
  }

  // --- busy state: one generation at a time ------------------------------------------------------
  function setBusy(controller) {
    // A Stop button that had focus is about to disappear: give focus back to where typing happens.
    const focusAfter = { "chat-stop": "chat-input", "completion-stop": "prompt-input" }[document.activeElement.id];
    state.controller = controller;
    const busy = controller !== null;
    $("chat-send").disabled = busy || !chatAvailable();
    $("completion-generate").disabled = busy;
    $("completion-continue").disabled = busy || state.tokens.length === 0;
    $("chat-stop").hidden = !busy || controller.mode !== "chat";
    $("completion-stop").hidden = !busy || controller.mode !== "completion";
    if (!busy && focusAfter) $(focusAfter).focus();
  }

  function stopGeneration() {
    if (state.controller) state.controller.abort();
  }

  // --- model info --------------------------------------------------------------------------------
  function formatCount(n) {
    if (typeof n !== "number") return "?";
    const units = [[1e9, "B"], [1e6, "M"], [1e3, "K"]];
    for (const [size, suffix] of units) {
      if (n >= size) return `${(n / size).toFixed(n >= 100 * size ? 0 : 1)}${suffix}`;
    }
    return String(n);
  }

  const chatAvailable = () => !state.info || state.info.chat !== false;

  function renderInfo(info) {
    const params = typeof info.parameters === "number"
      ? `${formatCount(info.parameters)} (${info.parameters.toLocaleString("en-US")})` : "?";
    $("info-checkpoint").textContent = info.checkpoint || info.model || "?";
    $("info-parameters").textContent = params;
    $("info-context").textContent = info.context_length != null ? `${info.context_length} tokens` : "?";
    $("info-vocab").textContent = info.vocab_size != null ? info.vocab_size.toLocaleString("en-US") : "?";
    $("info-tokenizer").textContent = info.tokenizer || "?";
    $("info-device").textContent = [info.device, info.dtype].filter(Boolean).join(" \u00b7 ") || "?";
    $("info-chat").textContent = info.chat ? "yes" : "no";
    $("model-badge").textContent = `${info.model || "model"} \u00b7 ${formatCount(info.parameters)} parameters`;
    const limit = Math.min(info.context_length || Infinity, (info.limits && info.limits.max_tokens) || Infinity);
    if (Number.isFinite(limit)) {
      $("max-tokens").max = String(limit);
      // Prompt and reply share the context window: leave room for the prompt on small models.
      if (store.get("setting.max-tokens") === null) $("max-tokens").value = String(Math.min(128, Math.ceil(limit / 2)));
    }
    document.title = `${info.model || "model"} \u2013 gptforge`;
    applyChatAvailability();
  }

  async function loadInfo() {
    try {
      state.info = await getJSON("/v1/gptforge/info");
      renderInfo(state.info);
      if (!state.modeChosen && !state.info.chat) setMode("completion", false);
    } catch (err) {
      $("model-badge").textContent = "Model information unavailable";
      showError(`Could not load model information: ${err.message}`);
      if (err.status === 401) {
        $("connection").open = true;
        $("api-key").focus();
      }
    }
  }

  // --- modes (tabs) ------------------------------------------------------------------------------
  const MODES = ["chat", "completion"];

  function setMode(mode, focusTab) {
    if (!MODES.includes(mode)) mode = "chat";
    for (const m of MODES) {
      const tab = $("tab-" + m);
      const on = m === mode;
      tab.setAttribute("aria-selected", String(on));
      tab.tabIndex = on ? 0 : -1;
      $("panel-" + m).hidden = !on;
    }
    if (focusTab) $("tab-" + mode).focus();
    hidePopup();
    store.set("mode", mode);
    if (location.hash !== "#" + mode) history.replaceState(null, "", "#" + mode);
  }

  function initTabs() {
    const chooseMode = (m, focusTab) => { state.modeChosen = true; setMode(m, focusTab); };
    for (const m of MODES) $("tab-" + m).addEventListener("click", () => chooseMode(m, false));
    document.querySelector('[role="tablist"]').addEventListener("keydown", (e) => {
      const current = MODES.findIndex((m) => $("tab-" + m).getAttribute("aria-selected") === "true");
      let next = null;
      if (e.key === "ArrowRight") next = (current + 1) % MODES.length;
      else if (e.key === "ArrowLeft") next = (current + MODES.length - 1) % MODES.length;
      else if (e.key === "Home") next = 0;
      else if (e.key === "End") next = MODES.length - 1;
      if (next === null) return;
      e.preventDefault();
      chooseMode(MODES[next], true);
    });
    window.addEventListener("hashchange", () => chooseMode(location.hash.slice(1), false));
    // A mode named in the URL or picked earlier in this tab wins; otherwise the model decides (loadInfo).
    const requested = location.hash.slice(1) || store.get("mode");
    state.modeChosen = MODES.includes(requested);
    setMode(requested || "chat", false);
  }

  // --- chat --------------------------------------------------------------------------------------
  function applyChatAvailability() {
    const ok = chatAvailable();
    $("chat-unavailable").hidden = ok;
    $("chat-input").disabled = !ok;
    $("chat-send").disabled = !ok || state.controller !== null;
    $("chat-empty").hidden = !ok || state.messages.length > 0;
  }

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  }

  // Adds a message bubble; returns its box and the text node that streamed content is appended to.
  function addBubble(role, text) {
    const box = document.createElement("div");
    box.className = "msg msg-" + role;
    const who = document.createElement("p");
    who.className = "msg-role";
    who.textContent = role === "user" ? "You" : "Model";
    const flag = document.createElement("span");
    flag.className = "ctx-flag";
    flag.textContent = " \u00b7 left out: no longer fits the context window";
    who.append(flag);
    const body = document.createElement("div");
    body.className = "msg-text";
    const node = document.createTextNode(text);
    body.append(node);
    const meta = document.createElement("p");
    meta.className = "msg-meta";
    box.append(who, body, meta);
    $("chat-empty").hidden = true;
    $("transcript").append(box);
    return { box, node, meta };
  }

  function scrollTranscript(force) {
    const t = $("transcript");
    if (force || nearBottom(t)) t.scrollTop = t.scrollHeight;
  }

  // state.messages[i] = {role, content, box}; those before state.start no longer fit the model's context
  // window and are not sent (the page cannot count tokens, so the server's error decides, see sendChat).
  function markContext() {
    state.messages.forEach((m, i) => m.box.classList.toggle("out-of-context", i < state.start));
  }

  // Leaves the oldest exchange out of the context; false when only the newest message is left.
  function dropOldest() {
    const last = state.messages.length - 1;
    if (state.start >= last) return false;
    state.start += 1;
    while (state.start < last && state.messages[state.start].role !== "user") state.start += 1;
    markContext();
    return true;
  }

  function saveChat() {
    store.set("chat", { start: state.start, messages: state.messages.map(({ role, content }) => ({ role, content })) });
  }

  function restoreChat() {
    const saved = store.get("chat");
    if (!saved || !Array.isArray(saved.messages)) return;
    for (const m of saved.messages) {
      if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") continue;
      state.messages.push({ role: m.role, content: m.content, box: addBubble(m.role, m.content).box });
    }
    state.start = Math.min(Number(saved.start) || 0, Math.max(0, state.messages.length - 1));
    markContext();
    scrollTranscript(true);
  }

  const FINISH_TEXT = {
    length: "Stopped at the token limit (max new tokens or the context window).",
    stop: "",
  };

  async function sendChat(text) {
    clearError();
    let params;
    try { params = samplingParams(); } catch (err) { showError(err.message); return; }
    const input = $("chat-input");
    const user = { role: "user", content: text, box: addBubble("user", text).box };
    state.messages.push(user);
    input.value = "";
    const reply = addBubble("assistant", "");
    reply.box.classList.add("streaming");
    const transcript = $("transcript");
    transcript.setAttribute("aria-busy", "true");
    scrollTranscript(true);

    const controller = new AbortController();
    controller.mode = "chat";
    setBusy(controller);
    const startBefore = state.start;
    let content = "";
    const onChoice = (choice) => {
      const delta = choice.delta && choice.delta.content;
      if (delta) {
        content += delta;
        reply.node.appendData(delta);
        scrollTranscript(false);
      }
    };
    try {
      let finish;
      for (;;) {
        const body = {
          model: state.info ? state.info.model : "gptforge",
          messages: state.messages.slice(state.start).map(({ role, content: c }) => ({ role, content: c })),
          stream: true,
          ...params,
        };
        try {
          finish = await streamPost("/v1/chat/completions", body, controller.signal, onChoice);
          break;
        } catch (err) {
          // Too long for the context window: leave the oldest exchange out and ask again.
          if (err.code !== "context_length_exceeded" || content !== "" || !dropOldest()) throw err;
        }
      }
      state.messages.push({ role: "assistant", content, box: reply.box });
      reply.meta.textContent = content ? (FINISH_TEXT[finish] || "") : "The model ended its reply without text.";
    } catch (err) {
      if (isAbort(err)) {
        // A partial reply stays in the conversation: it is what the user saw.
        if (content) state.messages.push({ role: "assistant", content, box: reply.box });
        reply.meta.textContent = content ? "Stopped." : "Stopped before any text arrived.";
      } else {
        // Undo the turn and give the message back so it can be sent again.
        state.messages.splice(state.messages.indexOf(user), 1);
        state.start = startBefore;
        markContext();
        user.box.remove();
        reply.box.remove();
        if (!input.value) input.value = text;
        $("chat-empty").hidden = state.messages.length > 0;
        showError(err.message);
      }
    } finally {
      reply.box.classList.remove("streaming");
      transcript.removeAttribute("aria-busy");
      setBusy(null);
      saveChat();
    }
  }

  function clearChat() {
    stopGeneration();
    state.messages = [];
    state.start = 0;
    saveChat();
    for (const el of $("transcript").querySelectorAll(".msg")) el.remove();
    $("chat-empty").hidden = !chatAvailable();
    clearError();
    $("chat-input").focus();
  }

  function initChat() {
    const input = $("chat-input");
    $("chat-form").addEventListener("submit", (e) => {
      e.preventDefault();
      const text = input.value;
      if (!text.trim() || state.controller || !chatAvailable()) return;
      sendChat(text);
    });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("chat-form").requestSubmit();
      }
    });
    $("chat-stop").addEventListener("click", stopGeneration);
    $("chat-clear").addEventListener("click", clearChat);
    $("go-completion").addEventListener("click", () => { state.modeChosen = true; setMode("completion", true); });
    restoreChat();
  }

  // --- completion with token inspection ----------------------------------------------------------
  function pct(p) {
    if (!(p >= 0)) return "?";
    const v = p * 100;
    if (v >= 10) return v.toFixed(1) + "%";
    if (v >= 0.01) return v.toPrecision(2) + "%";
    return v > 0 ? "<0.01%" : "0%";
  }

  const WS_NAMES = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" };
  const isBlank = (text) => /^[\s\u0000-\u001f\u007f]*$/.test(text);

  // Whitespace and control characters made visible: spaces as middle dots, tabs as arrows, newlines as a
  // return sign, other controls as their Unicode control pictures. Returns text and muted glyph spans.
  const MARKS = { " ": "\u00b7", "\t": "\u2192", "\n": "\u21b5", "\u007f": "\u2421" };
  function mark(ch) {
    if (ch in MARKS) return MARKS[ch];
    const code = ch.codePointAt(0);
    return code < 0x20 ? String.fromCodePoint(0x2400 + code) : null;
  }

  function visibleText(text) {
    const frag = document.createDocumentFragment();
    if (text === "") {
      const g = document.createElement("span");
      g.className = "glyph";
      g.textContent = "\u2205"; // empty set: a token with no text of its own (e.g. part of a character)
      frag.append(g);
      return frag;
    }
    let plain = "";
    const flush = () => { if (plain) frag.append(document.createTextNode(plain)); plain = ""; };
    for (const ch of text) {
      const glyph = mark(ch);
      if (glyph) {
        flush();
        const g = document.createElement("span");
        g.className = "glyph";
        g.textContent = glyph;
        frag.append(g);
      } else {
        plain += ch;
      }
    }
    flush();
    return frag;
  }

  function describeToken(text) {
    if (text === "") return "empty token";
    if (isBlank(text)) return [...text].map((c) => WS_NAMES[c] || "control character").join(" ");
    return text;
  }

  // Only whitespace-only tokens show glyphs in the running text, so prose stays readable; the
  // alternatives list shows every space because " the" and "the" are different tokens.
  function addToken(text, logprob, top, offset) {
    const i = state.tokens.length;
    const p = typeof logprob === "number" ? Math.exp(logprob) : null;
    const alts = top ? Object.entries(top).map(([t, lp]) => [t, Math.exp(lp)]).sort((a, b) => b[1] - a[1]) : [];
    state.tokens.push({ text, p, top: alts, offset });
    const el = document.createElement("span");
    el.className = "tok";
    el.dataset.i = String(i);
    el.setAttribute("role", "button");
    el.tabIndex = i === 0 ? 0 : -1;
    if (p !== null) el.style.setProperty("--p", p.toFixed(3));
    let breaks = "";
    if (isBlank(text)) {
      el.classList.add("ws");
      el.append(visibleText(text));
      el.setAttribute("aria-label", describeToken(text));
      // The line break goes after the token, so the token stays one line high and easy to hit.
      breaks = "\n".repeat((text.match(/\n/g) || []).length);
    } else {
      el.textContent = text;
      // Special tokens (end of text, chat roles) decode to their names; set them apart from prose.
      if (/^<\|[^|\s]+\|>$/.test(text)) el.classList.add("special");
    }
    $("generated").append(el);
    if (breaks) $("generated").append(breaks);
    // Spaces are drawn as dots, so give the line a place to wrap as a real space would.
    else if (el.classList.contains("ws")) $("generated").append(document.createElement("wbr"));
  }

  // Tokens that start at or after `end` (a text_offset: characters from the start of the prompt) were
  // generated but cut from the text, as part of a matched stop sequence. Returns how many.
  function markCut(end) {
    let cut = 0;
    state.tokens.forEach((tok, i) => {
      if (typeof tok.offset === "number" && tok.offset >= end && tok.text !== "") {
        tokenEl(i).classList.add("cut");
        tokenEl(i).title = "Generated, then cut: part of a stop sequence";
        cut += 1;
      }
    });
    return cut;
  }

  function addPlainText(text) {
    $("generated").append(document.createTextNode(text));
  }

  function tokenEl(i) {
    return $("generated").querySelector(`.tok[data-i="${i}"]`);
  }

  function tokenCell(text) {
    const code = document.createElement("code");
    code.className = "alt-tok";
    code.append(visibleText(text));
    code.title = JSON.stringify(text);
    return code;
  }

  function altRow(text, p, chosen) {
    const li = document.createElement("li");
    li.className = "alt" + (chosen ? " chosen" : "");
    if (chosen) li.setAttribute("aria-current", "true");
    const bar = document.createElement("span");
    bar.className = "alt-bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    bar.append(fill);
    const prob = document.createElement("span");
    prob.className = "alt-p";
    prob.textContent = pct(p);
    li.append(tokenCell(text), bar, prob);
    if (chosen) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "chosen";
      li.append(badge);
    }
    return li;
  }

  function fillPopup(i) {
    const tok = state.tokens[i];
    const title = $("tokpop-title");
    title.replaceChildren(`Step ${i + 1} of ${state.tokens.length}: chose `, tokenCell(tok.text), ` at ${pct(tok.p)}`);
    const list = $("tokpop-list");
    list.replaceChildren();
    let chosenShown = false;
    for (const [text, p] of tok.top) {
      const chosen = !chosenShown && text === tok.text;
      chosenShown = chosenShown || chosen;
      list.append(altRow(text, p, chosen));
    }
    if (!chosenShown && tok.p !== null) {
      const li = altRow(tok.text, tok.p, true);
      li.classList.add("outside");
      li.title = `Sampled from outside the ${tok.top.length} most likely tokens`;
      const note = document.createElement("span");
      note.className = "visually-hidden";
      note.textContent = ` (outside the top ${tok.top.length})`;
      li.append(note);
      list.append(li);
    }
    if (!tok.top.length) {
      const li = document.createElement("li");
      li.className = "alt";
      li.textContent = "The server sent no alternatives for this token.";
      list.append(li);
    }
  }

  function placePopup(el) {
    const pop = $("tokpop");
    const rects = el.getClientRects();
    const r = rects.length ? rects[0] : el.getBoundingClientRect();
    const vw = document.documentElement.clientWidth;
    const vh = window.innerHeight;
    const w = pop.offsetWidth;
    const h = pop.offsetHeight;
    const left = Math.max(8, Math.min(r.left, vw - w - 8));
    let top = r.bottom + 6;
    if (top + h > vh - 8 && r.top - h - 6 >= 8) top = r.top - h - 6;
    pop.style.left = `${left}px`;
    pop.style.top = `${Math.max(8, top)}px`;
  }

  let shown = -1;

  function showPopup(i) {
    const el = tokenEl(i);
    if (!el) return;
    if (shown !== i) {
      if (shown >= 0) {
        const old = tokenEl(shown);
        if (old) { old.classList.remove("active"); old.removeAttribute("aria-describedby"); }
      }
      fillPopup(i);
      shown = i;
    }
    el.classList.add("active");
    el.setAttribute("aria-describedby", "tokpop");
    $("tokpop").hidden = false;
    placePopup(el);
  }

  function hidePopup() {
    if (shown >= 0) {
      const el = tokenEl(shown);
      if (el) { el.classList.remove("active"); el.removeAttribute("aria-describedby"); }
    }
    shown = -1;
    state.pinned = -1;
    $("tokpop").hidden = true;
  }

  function focusToken(i) {
    const el = tokenEl(i);
    if (!el) return;
    for (const t of $("generated").querySelectorAll('.tok[tabindex="0"]')) t.tabIndex = -1;
    el.tabIndex = 0;
    el.focus();
  }

  function initTokenInspector() {
    const gen = $("generated");
    const indexOf = (target) => {
      const el = target instanceof Element ? target.closest(".tok") : null;
      return el && gen.contains(el) ? Number(el.dataset.i) : -1;
    };
    gen.addEventListener("mouseover", (e) => {
      const i = indexOf(e.target);
      if (i >= 0) showPopup(i);
    });
    gen.addEventListener("mouseleave", () => {
      if (state.pinned >= 0) showPopup(state.pinned);
      else hidePopup();
    });
    gen.addEventListener("click", (e) => {
      const i = indexOf(e.target);
      if (i < 0) return;
      state.pinned = i;
      showPopup(i);
    });
    gen.addEventListener("focusin", (e) => {
      const i = indexOf(e.target);
      if (i < 0) return;
      for (const t of gen.querySelectorAll('.tok[tabindex="0"]')) t.tabIndex = -1;
      e.target.tabIndex = 0;
      state.pinned = i;
      showPopup(i);
    });
    gen.addEventListener("focusout", (e) => {
      if (indexOf(e.relatedTarget) < 0) hidePopup();
    });
    gen.addEventListener("keydown", (e) => {
      const i = indexOf(e.target);
      if (i < 0) return;
      const last = state.tokens.length - 1;
      const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: last };
      if (e.key in moves) {
        e.preventDefault();
        focusToken(Math.max(0, Math.min(last, moves[e.key])));
      } else if (e.key === "Enter" || e.key === " ") {
        e.preventDefault();
        state.pinned = i;
        showPopup(i);
      } else if (e.key === "Escape") {
        hidePopup();
      }
    });
    document.addEventListener("click", (e) => {
      if (shown >= 0 && indexOf(e.target) < 0 && !$("tokpop").contains(e.target)) hidePopup();
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && shown >= 0) hidePopup();
    });
    const reposition = () => { if (shown >= 0) placePopup(tokenEl(shown)); };
    window.addEventListener("resize", reposition);
    window.addEventListener("scroll", reposition, true);
  }

  function resetOutput() {
    hidePopup();
    state.tokens = [];
    $("generated").replaceChildren();
    $("prompt-echo").textContent = "";
    $("completion-status").textContent = "";
    $("completion-continue").disabled = true;
  }

  async function generate(prompt) {
    clearError();
    let params;
    let k;
    try {
      params = samplingParams();
      k = intField("top-k-shown", "Alternatives shown per token", 1, 20);
    } catch (err) { showError(err.message); return; }
    resetOutput();
    $("prompt-echo").textContent = prompt;
    const out = $("completion-output");
    out.setAttribute("aria-busy", "true");
    $("completion-status").textContent = "Generating\u2026";
    const controller = new AbortController();
    controller.mode = "completion";
    setBusy(controller);
    let text = "";
    const body = {
      model: state.info ? state.info.model : "gptforge",
      prompt, stream: true, logprobs: k, ...params,
    };
    try {
      const finish = await streamPost("/v1/completions", body, controller.signal, (choice) => {
        const stick = nearBottom(out);
        const lp = choice.logprobs;
        // Tokens and text travel separately: the server holds text back while it could still be part of
        // a stop sequence (or of a UTF-8 character) and drops a matched stop sequence, but every sampled
        // token is reported once. So the view shows tokens, and text only when there are no logprobs.
        if (lp && Array.isArray(lp.tokens)) {
          lp.tokens.forEach((t, j) => addToken(t, lp.token_logprobs ? lp.token_logprobs[j] : null,
            lp.top_logprobs ? lp.top_logprobs[j] : null, lp.text_offset ? lp.text_offset[j] : null));
        } else if (choice.text) {
          addPlainText(choice.text);
        }
        text += choice.text || "";
        if (stick) out.scrollTop = out.scrollHeight;
      });
      const n = state.tokens.length;
      const cut = markCut(prompt.length + text.length);
      const why = finish === "length" ? "stopped at the token limit"
        : cut ? "stopped at a stop sequence (dimmed tokens are not part of the text)" : "the model stopped";
      $("completion-status").textContent = `${n} token${n === 1 ? "" : "s"}; ${why}.`;
    } catch (err) {
      if (isAbort(err)) {
        $("completion-status").textContent = `Stopped after ${state.tokens.length} tokens.`;
      } else {
        $("completion-status").textContent = "";
        showError(err.message);
      }
    } finally {
      state.lastText = prompt + text;
      out.removeAttribute("aria-busy");
      setBusy(null);
    }
  }

  function initCompletion() {
    const input = $("prompt-input");
    input.value = store.get("prompt", "");
    input.addEventListener("change", () => store.set("prompt", input.value));
    $("completion-form").addEventListener("submit", (e) => {
      e.preventDefault();
      if (state.controller) return;
      store.set("prompt", input.value);
      generate(input.value);
    });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        $("completion-form").requestSubmit();
      }
    });
    $("completion-stop").addEventListener("click", stopGeneration);
    $("completion-continue").addEventListener("click", () => {
      if (state.controller || !state.lastText) return;
      input.value = state.lastText;
      store.set("prompt", input.value);
      generate(input.value);
    });
    $("completion-clear").addEventListener("click", () => {
      stopGeneration();
      resetOutput();
      input.focus();
    });
    initTokenInspector();
  }

  // --- API key and banner ------------------------------------------------------------------------
  function initKey() {
    const key = $("api-key");
    key.value = store.get("apiKey", "");
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      store.set("apiKey", key.value.trim() || null);
      clearError();
      loadInfo();
    });
    $("api-key-forget").addEventListener("click", () => {
      key.value = "";
      store.set("apiKey", null);
    });
    $("error-close").addEventListener("click", clearError);
  }

  function init() {
    initSettings();
    initTabs();
    initChat();
    initCompletion();
    initKey();
    setBusy(null);
    loadInfo();
  }

  init();
})();
