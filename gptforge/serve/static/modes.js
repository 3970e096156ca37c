// The Chat / Completion tabs: the mode shows in the URL (#chat, #completion) and is kept per tab.

import { $, store } from "./dom.js";
import { hidePopup } from "./inspector.js";
import { session } from "./session.js";

const MODES = ["chat", "completion"];

export function setMode(mode, focusTab) {
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

// A mode the user picked: the model's lack of chat no longer overrides it.
export function chooseMode(mode, focusTab) {
  session.modeChosen = true;
  setMode(mode, focusTab);
}

export function initTabs() {
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
  session.modeChosen = MODES.includes(requested);
  setMode(requested || "chat", false);
}
