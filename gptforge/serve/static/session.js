// What the views share: the model's info and the one generation in flight (one at a time: one server
// slot). Views subscribe with onChange to redraw their buttons when either changes.

import { $ } from "./dom.js";

export const session = {
  info: null,            // /v1/gptforge/info, once loaded
  controller: null,      // AbortController of the generation in flight, with .mode "chat" or "completion"
  modeChosen: false,     // the user (or URL) picked a mode: a model without chat does not override it
};

const listeners = [];

export function onChange(listener) {
  listeners.push(listener);
}

function changed() {
  for (const listener of listeners) listener();
}

export function setInfo(info) {
  session.info = info;
  changed();
}

export function setBusy(controller) {
  session.controller = controller;
  changed();
}

export function stopGeneration() {
  if (session.controller) session.controller.abort();
}

export const chatAvailable = () => !session.info || session.info.chat !== false;

export const modelName = () => (session.info ? session.info.model : "gptforge");

// A Stop button that is about to disappear while it has focus gives focus back to where typing happens.
export function hideStop(stopId, inputId, hidden) {
  const stop = $(stopId);
  const hadFocus = document.activeElement === stop;
  stop.hidden = hidden;
  if (hidden && hadFocus) $(inputId).focus();
}
