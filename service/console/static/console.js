// The console's entry point: a hash router over the views, and the token prompt shown
// whenever the service answers 401 (nothing but this prompt is reachable without a token).
"use strict";

import { setToken, token, whenUnauthorized } from "./api.js";
import { compareView } from "./compare.js";
import { editorView } from "./editor.js";
import { jobView } from "./job.js";
import { jobsView } from "./jobs.js";
import { h } from "./render.js";
import { serviceView } from "./service.js";

const view = document.getElementById("view");
const signOut = document.getElementById("sign-out");
let cleanup = () => {};
let route = 0;

function navigate(hash) {
  if (location.hash === hash) show(); else location.hash = hash;
}

function authView(refused) {
  cleanup();
  cleanup = () => {};
  const input = h("input", { id: "token", type: "password", autocomplete: "off", "aria-label": "Bearer token", size: 36 });
  const form = h("form", { id: "token-form" },
    h("div", { class: "row" }, input, h("button", { class: "primary", type: "submit" }, "Sign in")));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    show();
  });
  document.title = "401 · tureen console";
  view.replaceChildren(h("div", { class: "auth", id: "unauthorized" },
    h("p", { class: "code" }, "401"),
    h("h1", {}, "This service needs a token"),
    h("p", {}, refused
      ? "The token was refused. Give one of the service's API tokens (TUREEN_API_TOKENS)."
      : "Give one of the service's API tokens (TUREEN_API_TOKENS). It is kept in this tab only and sent as the bearer header."),
    form));
  input.focus();
}

async function show() {
  const mine = ++route;
  cleanup();
  cleanup = () => {};
  signOut.hidden = !token();
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean);
  const name = parts[0] || "jobs";
  for (const link of document.querySelectorAll("header nav a")) {
    link.classList.toggle("active", link.dataset.view === name);
  }
  document.title = `${name} · tureen console`;
  view.setAttribute("aria-busy", "true");
  try {
    let done;
    if (name === "new") done = await editorView(view, navigate);
    else if (["merges", "trainings", "searches"].includes(name) && parts[1]) done = await jobView(view, navigate, name, parts[1]);
    else if (name === "compare") done = await compareView(view, navigate, new URLSearchParams(query || ""));
    else if (name === "service") done = await serviceView(view);
    else done = await jobsView(view, navigate);
    if (mine === route && typeof done === "function") cleanup = done;
    else if (typeof done === "function") done();
  } catch (error) {
    if (error.status !== 401 && mine === route) {
      view.replaceChildren(h("p", { class: "error", id: "view-error" }, `${error.code || "error"}: ${error.message}`));
    }
  } finally {
    view.removeAttribute("aria-busy");
  }
}

whenUnauthorized(() => { route += 1; authView(Boolean(token())); });
signOut.addEventListener("click", () => { setToken(""); show(); });
window.addEventListener("hashchange", show);
show();
