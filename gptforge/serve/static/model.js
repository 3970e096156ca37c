// The model panel: what /v1/gptforge/info says about the checkpoint, and the key the server may want.

import { getJSON } from "./api.js";
import { $, clearError, showError, store } from "./dom.js";
import { setMode } from "./modes.js";
import { session, setInfo } from "./session.js";
import { limitMaxTokens } from "./settings.js";

function formatCount(n) {
  if (typeof n !== "number") return "?";
  const units = [[1e9, "B"], [1e6, "M"], [1e3, "K"]];
  for (const [size, suffix] of units) {
    if (n >= size) return `${(n / size).toFixed(n >= 100 * size ? 0 : 1)}${suffix}`;
  }
  return String(n);
}

function renderInfo(info) {
  const params = typeof info.parameters === "number"
    ? `${formatCount(info.parameters)} (${info.parameters.toLocaleString("en-US")})` : "?";
  $("info-checkpoint").textContent = info.checkpoint || info.model || "?";
  $("info-parameters").textContent = params;
  $("info-context").textContent = info.context_length != null ? `${info.context_length} tokens` : "?";
  $("info-vocab").textContent = info.vocab_size != null ? info.vocab_size.toLocaleString("en-US") : "?";
  $("info-tokenizer").textContent = info.tokenizer || "?";
  const weights = info.weights && info.weights !== "none" ? `${info.weights} weights` : null;
  $("info-device").textContent = [info.device, info.dtype, weights].filter(Boolean).join(" \u00b7 ") || "?";
  $("info-chat").textContent = info.chat ? "yes" : "no";
  $("model-badge").textContent = `${info.model || "model"} \u00b7 ${formatCount(info.parameters)} parameters`;
  const limit = Math.min(info.context_length || Infinity, (info.limits && info.limits.max_tokens) || Infinity);
  if (Number.isFinite(limit)) limitMaxTokens(limit);
  document.title = `${info.model || "model"} \u2013 gptforge`;
}

export async function loadInfo() {
  try {
    const info = await getJSON("/v1/gptforge/info");
    renderInfo(info);
    setInfo(info);
    if (!session.modeChosen && !info.chat) setMode("completion", false);
  } catch (err) {
    $("model-badge").textContent = "Model information unavailable";
    showError(`Could not load model information: ${err.message}`);
    if (err.status === 401) {
      $("connection").open = true;
      $("api-key").focus();
    }
  }
}

export function initKey() {
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
