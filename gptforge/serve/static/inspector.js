// The token inspector: hovering, tapping or focusing a generated token opens the alternatives the model
// weighed at that step, the chosen one marked. Arrow keys move between tokens; Escape closes.

import { $ } from "./dom.js";
import { pct, tokenEl, tokens, visibleText } from "./tokens.js";

let shown = -1;   // token whose alternatives are open, -1 for none
let pinned = -1;  // token whose alternatives stay open (click / focus), -1 for none

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

// The chosen token gets a row of its own below the alternatives when sampling picked one outside them.
function outsideRow(tok) {
  const li = altRow(tok.text, tok.p, true);
  li.classList.add("outside");
  li.title = `Sampled from outside the ${tok.top.length} most likely tokens`;
  const note = document.createElement("span");
  note.className = "visually-hidden";
  note.textContent = ` (outside the top ${tok.top.length})`;
  li.append(note);
  return li;
}

function fillPopup(i) {
  const tok = tokens[i];
  $("tokpop-title").replaceChildren(`Step ${i + 1} of ${tokens.length}: chose `, tokenCell(tok.text),
    ` at ${pct(tok.p)}`);
  const list = $("tokpop-list");
  list.replaceChildren();
  let chosenShown = false;
  for (const [text, p] of tok.top) {
    const chosen = !chosenShown && text === tok.text;
    chosenShown = chosenShown || chosen;
    list.append(altRow(text, p, chosen));
  }
  if (!chosenShown && tok.p !== null) list.append(outsideRow(tok));
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

function unmark(i) {
  const el = i >= 0 ? tokenEl(i) : null;
  if (el) { el.classList.remove("active"); el.removeAttribute("aria-describedby"); }
}

function showPopup(i) {
  const el = tokenEl(i);
  if (!el) return;
  if (shown !== i) {
    unmark(shown);
    fillPopup(i);
    shown = i;
  }
  el.classList.add("active");
  el.setAttribute("aria-describedby", "tokpop");
  $("tokpop").hidden = false;
  placePopup(el);
}

export function hidePopup() {
  unmark(shown);
  shown = -1;
  pinned = -1;
  $("tokpop").hidden = true;
}

function pin(i) {
  pinned = i;
  showPopup(i);
}

function focusToken(i) {
  const el = tokenEl(i);
  if (!el) return;
  for (const t of $("generated").querySelectorAll('.tok[tabindex="0"]')) t.tabIndex = -1;
  el.tabIndex = 0;
  el.focus();
}

function onKey(e, i) {
  const last = tokens.length - 1;
  const moves = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: last };
  if (e.key in moves) {
    e.preventDefault();
    focusToken(Math.max(0, Math.min(last, moves[e.key])));
  } else if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    pin(i);
  } else if (e.key === "Escape") {
    hidePopup();
  }
}

export function initTokenInspector() {
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
    if (pinned >= 0) showPopup(pinned);
    else hidePopup();
  });
  gen.addEventListener("click", (e) => {
    const i = indexOf(e.target);
    if (i >= 0) pin(i);
  });
  gen.addEventListener("focusin", (e) => {
    const i = indexOf(e.target);
    if (i < 0) return;
    for (const t of gen.querySelectorAll('.tok[tabindex="0"]')) t.tabIndex = -1;
    e.target.tabIndex = 0;
    pin(i);
  });
  gen.addEventListener("focusout", (e) => {
    if (indexOf(e.relatedTarget) < 0) hidePopup();
  });
  gen.addEventListener("keydown", (e) => {
    const i = indexOf(e.target);
    if (i >= 0) onKey(e, i);
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
