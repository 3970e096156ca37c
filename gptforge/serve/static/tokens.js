// The generated tokens of completion mode, each a focusable span coloured by its probability. Model output
// only ever reaches the page through textContent / text nodes, never innerHTML.

import { $ } from "./dom.js";

export const tokens = [];  // {text, p, top: [[token, p], ...] most likely first, offset}

export function clearTokens() {
  tokens.length = 0;
  $("generated").replaceChildren();
}

export function tokenEl(i) {
  return $("generated").querySelector(`.tok[data-i="${i}"]`);
}

export function pct(p) {
  if (!(p >= 0)) return "?";
  const v = p * 100;
  if (v >= 10) return v.toFixed(1) + "%";
  if (v >= 0.01) return v.toPrecision(2) + "%";
  return v > 0 ? "<0.01%" : "0%";
}

const WS_NAMES = { " ": "space", "\n": "newline", "\t": "tab", "\r": "carriage return" };
const isBlank = (text) => /^[\s\u0000-\u001f\u007f]*$/.test(text);

// Whitespace and control characters made visible: spaces as middle dots, tabs as arrows, newlines as a
// return sign, other controls as their Unicode control pictures.
const MARKS = { " ": "\u00b7", "\t": "\u2192", "\n": "\u21b5", "\u007f": "\u2421" };
function mark(ch) {
  if (ch in MARKS) return MARKS[ch];
  const code = ch.codePointAt(0);
  return code < 0x20 ? String.fromCodePoint(0x2400 + code) : null;
}

function glyph(text) {
  const g = document.createElement("span");
  g.className = "glyph";
  g.textContent = text;
  return g;
}

// Text with its whitespace as muted glyph spans; the empty token as an empty-set sign (a token with no
// text of its own, e.g. part of a character).
export function visibleText(text) {
  const frag = document.createDocumentFragment();
  if (text === "") {
    frag.append(glyph("\u2205"));
    return frag;
  }
  let plain = "";
  const flush = () => { if (plain) frag.append(document.createTextNode(plain)); plain = ""; };
  for (const ch of text) {
    const g = mark(ch);
    if (g) {
      flush();
      frag.append(glyph(g));
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
export function addToken(text, logprob, top, offset) {
  const i = tokens.length;
  const p = typeof logprob === "number" ? Math.exp(logprob) : null;
  const alts = top ? Object.entries(top).map(([t, lp]) => [t, Math.exp(lp)]).sort((a, b) => b[1] - a[1]) : [];
  tokens.push({ text, p, top: alts, offset });
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

export function addPlainText(text) {
  $("generated").append(document.createTextNode(text));
}

// Tokens that start at or after `end` (a text_offset: characters from the start of the prompt) were
// generated but cut from the text, as part of a matched stop sequence. Returns how many.
export function markCut(end) {
  let cut = 0;
  tokens.forEach((tok, i) => {
    if (typeof tok.offset === "number" && tok.offset >= end && tok.text !== "") {
      tokenEl(i).classList.add("cut");
      tokenEl(i).title = "Generated, then cut: part of a stop sequence";
      cut += 1;
    }
  });
  return cut;
}
