// The sampling settings in the sidebar: kept per tab, checked before a request is sent.

import { ApiError } from "./api.js";
import { $, store } from "./dom.js";

const SETTINGS = ["temperature", "top-p", "max-tokens", "seed", "stop", "top-k-shown"];

function unescapeStop(s) {
  return s.replace(/\\(n|t|\\)/g, (_, c) => (c === "n" ? "\n" : c === "t" ? "\t" : "\\"));
}

export function intField(id, label, min, max) {
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
export function samplingParams() {
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

// The model's limit on new tokens; the default leaves room for the prompt on small models (prompt and
// reply share the context window).
export function limitMaxTokens(limit) {
  $("max-tokens").max = String(limit);
  if (store.get("setting.max-tokens") === null) $("max-tokens").value = String(Math.min(128, Math.ceil(limit / 2)));
}

export function initSettings() {
  for (const id of SETTINGS) {
    const saved = store.get("setting." + id);
    if (saved !== null) $(id).value = saved;
    $(id).addEventListener("change", () => store.set("setting." + id, $(id).value));
  }
  $("temperature").addEventListener("input", showRangeValues);
  $("top-p").addEventListener("input", showRangeValues);
  showRangeValues();
}
