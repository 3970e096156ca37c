// Chat mode: a streamed conversation. The server decides what still fits the model's context window
// (truncate_history: the oldest exchanges go first, the rule of `gptforge chat`); the page marks what it
// left out and never sends that again, so a left-out exchange does not come back mid-conversation.

import { isAbort, streamPost } from "./api.js";
import { $, clearError, nearBottom, showError, store } from "./dom.js";
import { chooseMode } from "./modes.js";
import { chatAvailable, hideStop, modelName, onChange, session, setBusy, stopGeneration } from "./session.js";
import { samplingParams } from "./settings.js";

const DROPPED_HEADER = "X-Gptforge-Dropped-Messages";
const FINISH_TEXT = {
  length: "Stopped at the token limit (max new tokens or the context window).",
  stop: "",
};

let messages = [];  // the conversation: {role, content, box}
let start = 0;      // messages before this index no longer fit the context window and are not sent

function render() {
  const ok = chatAvailable();
  $("chat-unavailable").hidden = ok;
  $("chat-input").disabled = !ok;
  $("chat-send").disabled = !ok || session.controller !== null;
  $("chat-empty").hidden = !ok || messages.length > 0;
  hideStop("chat-stop", "chat-input", !session.controller || session.controller.mode !== "chat");
}

// Adds a message bubble; returns its box, the text node that streamed content is appended to, and its text.
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
  return { box, node, meta, text };
}

function scrollTranscript(force) {
  const t = $("transcript");
  if (force || nearBottom(t)) t.scrollTop = t.scrollHeight;
}

function markContext() {
  messages.forEach((m, i) => m.box.classList.toggle("out-of-context", i < start));
}

function saveChat() {
  store.set("chat", { start, messages: messages.map(({ role, content }) => ({ role, content })) });
}

function restoreChat() {
  const saved = store.get("chat");
  if (!saved || !Array.isArray(saved.messages)) return;
  for (const m of saved.messages) {
    if (!m || (m.role !== "user" && m.role !== "assistant") || typeof m.content !== "string") continue;
    messages.push({ role: m.role, content: m.content, box: addBubble(m.role, m.content).box });
  }
  start = Math.min(Number(saved.start) || 0, Math.max(0, messages.length - 1));
  markContext();
  scrollTranscript(true);
}

// Streams the reply to what is still in context into `reply` (its text grows as it arrives); the server
// leaves out the oldest exchanges that no longer fit and says how many (they are sent first, so `start`
// moves past them). Resolves with the finish reason.
function streamReply(controller, params, reply) {
  const body = {
    model: modelName(),
    messages: messages.slice(start).map(({ role, content }) => ({ role, content })),
    stream: true,
    truncate_history: true,
    ...params,
  };
  const onOpen = (res) => {
    start += Number(res.headers.get(DROPPED_HEADER)) || 0;
    markContext();
  };
  const onChoice = (choice) => {
    const delta = choice.delta && choice.delta.content;
    if (!delta) return;
    reply.text += delta;
    reply.node.appendData(delta);
    scrollTranscript(false);
  };
  return streamPost("/v1/chat/completions", body, controller.signal, onChoice, onOpen);
}

// A turn that failed leaves no trace but its message, given back so it can be sent again.
function undoTurn(user, reply, startBefore) {
  messages.splice(messages.indexOf(user), 1);
  start = startBefore;
  markContext();
  user.box.remove();
  reply.box.remove();
  if (!$("chat-input").value) $("chat-input").value = user.content;
  $("chat-empty").hidden = messages.length > 0;
}

async function sendChat(text) {
  clearError();
  let params;
  try { params = samplingParams(); } catch (err) { showError(err.message); return; }
  const input = $("chat-input");
  const user = { role: "user", content: text, box: addBubble("user", text).box };
  messages.push(user);
  input.value = "";
  const reply = addBubble("assistant", "");
  reply.box.classList.add("streaming");
  const transcript = $("transcript");
  transcript.setAttribute("aria-busy", "true");
  scrollTranscript(true);

  const controller = new AbortController();
  controller.mode = "chat";
  setBusy(controller);
  const startBefore = start;
  try {
    const finish = await streamReply(controller, params, reply);
    messages.push({ role: "assistant", content: reply.text, box: reply.box });
    reply.meta.textContent = reply.text ? (FINISH_TEXT[finish] || "") : "The model ended its reply without text.";
  } catch (err) {
    if (isAbort(err)) {
      // A partial reply stays in the conversation: it is what the user saw.
      if (reply.text) messages.push({ role: "assistant", content: reply.text, box: reply.box });
      reply.meta.textContent = reply.text ? "Stopped." : "Stopped before any text arrived.";
    } else {
      undoTurn(user, reply, startBefore);
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
  messages = [];
  start = 0;
  saveChat();
  for (const el of $("transcript").querySelectorAll(".msg")) el.remove();
  $("chat-empty").hidden = !chatAvailable();
  clearError();
  $("chat-input").focus();
}

export function initChat() {
  const input = $("chat-input");
  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value;
    if (!text.trim() || session.controller || !chatAvailable()) return;
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
  $("go-completion").addEventListener("click", () => chooseMode("completion", true));
  onChange(render);
  restoreChat();
}
