// gptforge web app: chat and token-inspecting completion against the server's OpenAI-style routes.
// Native ES modules, no framework or build step (index.html loads this one as type="module"):
//   api.js       HTTP and server-sent events, the API key, the server's errors
//   session.js   what the views share: model info, the generation in flight
//   dom.js       element lookup, per-tab storage, the error banner
//   settings.js  the sampling settings       modes.js   the Chat / Completion tabs
//   model.js     the model panel and API key  chat.js    chat mode
//   completion.js, tokens.js, inspector.js   completion mode, its tokens and their alternatives
// Model output only ever reaches the page through textContent / text nodes, never innerHTML.

import { initChat } from "./chat.js";
import { initCompletion } from "./completion.js";
import { initKey, loadInfo } from "./model.js";
import { initTabs } from "./modes.js";
import { setBusy } from "./session.js";
import { initSettings } from "./settings.js";

initSettings();
initTabs();
initChat();
initCompletion();
initKey();
setBusy(null);  // draws every view's buttons once
loadInfo();
