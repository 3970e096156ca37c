// Completion mode: the model continues a prompt; every token is shown with its probability (tokens.js) and
// its alternatives (inspector.js).

import { isAbort, streamPost } from "./api.js";
import { $, clearError, nearBottom, showError, store } from "./dom.js";
import { hidePopup, initTokenInspector } from "./inspector.js";
import { hideStop, modelName, onChange, session, setBusy, stopGeneration } from "./session.js";
import { intField, samplingParams } from "./settings.js";
import { addPlainText, addToken, clearTokens, markCut, tokens } from "./tokens.js";

let lastText = "";  // prompt + completion text, for "Continue from output"

function render() {
  const busy = session.controller !== null;
  $("completion-generate").disabled = busy;
  $("completion-continue").disabled = busy || tokens.length === 0;
  hideStop("completion-stop", "prompt-input", !busy || session.controller.mode !== "completion");
}

function resetOutput() {
  hidePopup();
  clearTokens();
  $("prompt-echo").textContent = "";
  $("completion-status").textContent = "";
  $("completion-continue").disabled = true;
}

// Tokens and text travel separately: the server holds text back while it could still be part of a stop
// sequence (or of a UTF-8 character) and drops a matched stop sequence, but every sampled token is
// reported once. So the view shows tokens, and text only when there are no logprobs.
function showChoice(choice) {
  const lp = choice.logprobs;
  if (lp && Array.isArray(lp.tokens)) {
    lp.tokens.forEach((t, j) => addToken(t, lp.token_logprobs ? lp.token_logprobs[j] : null,
      lp.top_logprobs ? lp.top_logprobs[j] : null, lp.text_offset ? lp.text_offset[j] : null));
  } else if (choice.text) {
    addPlainText(choice.text);
  }
}

function finishedStatus(finish, cut) {
  const n = tokens.length;
  const why = finish === "length" ? "stopped at the token limit"
    : cut ? "stopped at a stop sequence (dimmed tokens are not part of the text)" : "the model stopped";
  return `${n} token${n === 1 ? "" : "s"}; ${why}.`;
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
  const body = { model: modelName(), prompt, stream: true, logprobs: k, ...params };
  try {
    const finish = await streamPost("/v1/completions", body, controller.signal, (choice) => {
      const stick = nearBottom(out);
      showChoice(choice);
      text += choice.text || "";
      if (stick) out.scrollTop = out.scrollHeight;
    });
    $("completion-status").textContent = finishedStatus(finish, markCut(prompt.length + text.length));
  } catch (err) {
    if (isAbort(err)) {
      $("completion-status").textContent = `Stopped after ${tokens.length} tokens.`;
    } else {
      $("completion-status").textContent = "";
      showError(err.message);
    }
  } finally {
    lastText = prompt + text;
    out.removeAttribute("aria-busy");
    setBusy(null);
  }
}

export function initCompletion() {
  const input = $("prompt-input");
  input.value = store.get("prompt", "");
  input.addEventListener("change", () => store.set("prompt", input.value));
  $("completion-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (session.controller) return;
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
    if (session.controller || !lastText) return;
    input.value = lastText;
    store.set("prompt", input.value);
    generate(input.value);
  });
  $("completion-clear").addEventListener("click", () => {
    stopGeneration();
    resetOutput();
    input.focus();
  });
  onChange(render);
  initTokenInspector();
}
