// The jobs list: merges, trainings and searches in one table, newest first, a page at a time.
// Each kind is paginated by its own API; a page of the union is read from both with one
// cursor per kind, so even the thousandth job costs one small request per kind.
"use strict";

import { getJson } from "./api.js";
import { badge, h, when } from "./render.js";

const PAGE_SIZE = 50;
const KINDS = { merges: "/v1/merges", trainings: "/v1/trainings", searches: "/v1/searches" };

// Kept across visits to the list, so coming back from a job returns to the same page.
const state = { status: "", kind: "all", pages: [{ merges: 0, trainings: 0, searches: 0 }] };

function summary(kind, job) {
  if (kind === "trainings") return `${job.kind} training${job.name ? ` ${job.name}` : ""}`;
  if (kind === "searches") {
    const strategy = (job.spec && job.spec.strategy && job.spec.strategy.name) || "";
    return `${strategy} search${job.name ? ` → ${job.name}` : ""}`;
  }
  const recipe = job.recipe || {};
  const method = job.stages ? `${job.stages.length} merges` : recipe.merge_method || "merge";
  return `${method}${job.output && job.output.name ? ` → ${job.output.name}` : ""}`;
}

function progressText(job) {
  const progress = job.progress || {};
  if (job.status === "succeeded") return "done";
  if (progress.evaluations_total) return `${progress.evaluations_done || 0}/${progress.evaluations_total} evaluations`;
  if (progress.steps_total) return `${progress.steps_done || 0}/${progress.steps_total} steps`;
  if (progress.tensors_total) return `${progress.tensors_done}/${progress.tensors_total} tensors`;
  return progress.phase || "";
}

async function readPage(cursor) {
  const kinds = state.kind === "all" ? Object.keys(KINDS) : [state.kind];
  const query = (offset) => `?limit=${PAGE_SIZE}&offset=${offset}${state.status ? `&status=${state.status}` : ""}`;
  const answers = await Promise.all(kinds.map((kind) => getJson(KINDS[kind] + query(cursor[kind]))));
  const rows = [];
  let total = 0;
  kinds.forEach((kind, index) => {
    total += answers[index].total;
    for (const job of answers[index].items) rows.push({ kind, job });
  });
  rows.sort((a, b) => (a.job.created_at < b.job.created_at ? 1 : a.job.created_at > b.job.created_at ? -1 : 0));
  const shown = rows.slice(0, PAGE_SIZE);
  const next = { ...cursor };
  for (const row of shown) next[row.kind] += 1;
  return { shown, total, next };
}

/** The jobs view. */
export async function jobsView(root, navigate) {
  const selected = new Set();
  const body = h("tbody");
  const position = h("span", { id: "page-position" });
  const previous = h("button", { type: "button", id: "previous-page" }, "← Newer");
  const next = h("button", { type: "button", id: "next-page" }, "Older →");
  const compare = h("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected");
  let nextCursor = null;

  async function show() {
    const index = state.pages.length - 1;
    body.replaceChildren(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "Loading…")));
    const page = await readPage(state.pages[index]);
    nextCursor = page.next;
    const first = index * PAGE_SIZE;
    position.textContent = page.total
      ? `${first + 1}–${first + page.shown.length} of ${page.total}` : "No jobs yet.";
    previous.disabled = index === 0;
    next.disabled = first + page.shown.length >= page.total;
    body.replaceChildren(...page.shown.map(({ kind, job }) => {
      const box = kind === "merges" && job.status === "succeeded"
        ? h("input", { type: "checkbox", "aria-label": `select ${job.id}`, onchange: (event) => {
          if (event.target.checked) selected.add(job.id); else selected.delete(job.id);
          compare.disabled = selected.size !== 2;
        } }) : "";
      return h("tr", { "data-job": job.id },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/${kind}/${job.id}`, class: "mono" }, job.id)),
        h("td", {}, badge(job.status)),
        h("td", {}, summary(kind, job)),
        h("td", {}, progressText(job)),
        h("td", {}, when(job.created_at)));
    }));
  }
  previous.addEventListener("click", () => { if (state.pages.length > 1) { state.pages.pop(); show(); } });
  next.addEventListener("click", () => { state.pages.push(nextCursor); show(); });
  compare.addEventListener("click", () => {
    const [a, b] = [...selected];
    navigate(`#/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  });
  function restart() { state.pages = [{ merges: 0, trainings: 0, searches: 0 }]; show(); }
  const statusSelect = h("select", { id: "status-filter", onchange: (event) => { state.status = event.target.value; restart(); } },
    ["", "queued", "running", "paused", "publishing", "succeeded", "failed", "cancelled"].map((value) =>
      h("option", { value, selected: value === state.status }, value || "any status")));
  const kindSelect = h("select", { id: "kind-filter", onchange: (event) => { state.kind = event.target.value; restart(); } },
    [["all", "all kinds"], ["merges", "merges"], ["trainings", "trainings"], ["searches", "searches"]].map(([value, label]) =>
      h("option", { value, selected: value === state.kind }, label)));
  root.replaceChildren(
    h("h1", {}, "Jobs"),
    h("div", { class: "row" }, kindSelect, statusSelect,
      h("button", { type: "button", onclick: () => show() }, "Refresh"), compare),
    h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, h("th", {}, ""), h("th", {}, "job"), h("th", {}, "status"),
        h("th", {}, "what"), h("th", {}, "progress"), h("th", {}, "created"))),
      body),
    h("div", { class: "pager" }, previous, position, next));
  await show();
}
