// Small DOM helpers shared by the views: element lookup, per-tab storage, the error banner.

export const $ = (id) => document.getElementById(id);

// sessionStorage (may be unavailable, e.g. some private modes): the page still works, it just forgets on
// reload.
export const store = {
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
    } catch { /* storage full or disabled */ }
  },
};

export function showError(message) {
  $("error-text").textContent = message;
  $("error-banner").hidden = false;
}

export function clearError() {
  $("error-banner").hidden = true;
  $("error-text").textContent = "";
}

export function nearBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
}
