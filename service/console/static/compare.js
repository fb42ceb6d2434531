// Two merges side by side: their recipes diffed, their scores, and how far each moved from
// the base, per layer (relative L2 from GET /v1/merges/{id}/tensor-stats), as heat strips.
"use strict";

import { getJson } from "./api.js";
import { errorPanel } from "./editor.js";
import { finalScore } from "./evaluation.js";
import { heatStrip } from "./plots.js";
import { bytes, compact, diffLines, h, score, seconds, yaml } from "./render.js";

function diffView(left, right) {
  const lines = diffLines(yaml(compact(left)), yaml(compact(right)));
  const a = h("pre", { id: "diff-a" });
  const b = h("pre", { id: "diff-b" });
  for (const line of lines) {
    if (line.op !== "+") a.append(h("span", { class: line.op === "-" ? "del" : "" }, line.text || " "));
    if (line.op !== "-") b.append(h("span", { class: line.op === "+" ? "add" : "" }, line.text || " "));
  }
  return h("div", { class: "diff" }, a, b);
}

function baseOf(job) {
  const base = job.recipe && job.recipe.base_model;
  if (typeof base === "string") return base;
  if (base && typeof base.model === "string") return base.model;
  return "";
}

async function changeView(a, b, base, box) {
  box.replaceChildren(h("p", { class: "muted" }, "Reading both outputs and the base, tensor by tensor…"));
  try {
    const query = `?base=${encodeURIComponent(base)}`;
    const [left, right] = await Promise.all([a, b].map((job) =>
      getJson(`/v1/merges/${encodeURIComponent(job.id)}/tensor-stats${query}`)));
    const labels = [...new Set([...left.layers, ...right.layers].map((layer) => layer.label))];
    const row = (label, stats) => {
      const byLabel = new Map(stats.layers.map((layer) => [layer.label, layer.relative_l2]));
      return { label, cells: labels.map((name) => ({ label: name, value: byLabel.has(name) ? byLabel.get(name) : NaN })) };
    };
    box.replaceChildren(heatStrip([row(`A ${a.id.slice(0, 8)}`, left), row(`B ${b.id.slice(0, 8)}`, right)]),
      h("p", { class: "muted" }, `Overall relative L2: A ${score(left.relative_l2)}, B ${score(right.relative_l2)}; `,
        `${left.tensors.length} tensors compared with ${left.base}.`));
  } catch (error) { box.replaceChildren(errorPanel(error)); }
}

async function chooser(root, navigate, given) {
  const page = await getJson("/v1/merges?status=succeeded&limit=100");
  const select = (name, value) => h("select", { id: `compare-${name}` },
    h("option", { value: "" }, `merge ${name.toUpperCase()}…`),
    page.items.map((job) => h("option", { value: job.id, selected: job.id === value },
      `${job.id.slice(0, 12)} ${job.recipe.merge_method || ""} ${job.output.name || ""}`)));
  const a = select("a", given.a);
  const b = select("b", given.b);
  root.replaceChildren(h("h1", {}, "Compare two merges"),
    page.items.length < 2 ? h("p", { class: "muted" }, "Two succeeded merges are needed.") : "",
    h("div", { class: "row" }, a, b, h("button", { class: "primary", type: "button", onclick: () => {
      if (a.value && b.value) navigate(`#/compare?a=${encodeURIComponent(a.value)}&b=${encodeURIComponent(b.value)}`);
    } }, "Compare")));
}

/** The compare view for ``params`` (a, b: job ids). */
export async function compareView(root, navigate, params) {
  const given = { a: params.get("a") || "", b: params.get("b") || "" };
  if (!given.a || !given.b) return chooser(root, navigate, given);
  const [a, b] = await Promise.all([given.a, given.b].map((id) => getJson(`/v1/merges/${encodeURIComponent(id)}`)));
  const baseInput = h("input", { id: "compare-base", value: baseOf(a) || baseOf(b), size: 50 });
  const changes = h("div", { id: "changes" });
  const column = (job) => [job.recipe.merge_method || (job.stages ? "multi" : ""), score(finalScore(job.evaluation)),
    job.merge_seconds ? seconds(job.merge_seconds) : "–", bytes(job.bytes_written)];
  const [ca, cb] = [column(a), column(b)];
  root.replaceChildren(
    h("h1", {}, "Compare ", h("a", { href: `#/merges/${a.id}`, class: "mono" }, a.id.slice(0, 12)), " and ",
      h("a", { href: `#/merges/${b.id}`, class: "mono" }, b.id.slice(0, 12))),
    h("section", { class: "panel" }, h("h2", {}, "Scores"),
      h("table", { id: "compare-scores" }, h("tr", {}, h("th", {}, ""), h("th", {}, "A"), h("th", {}, "B")),
        ["method", "final score", "merge time", "bytes written"].map((label, index) =>
          h("tr", {}, h("th", {}, label), h("td", {}, ca[index]), h("td", {}, cb[index]))))),
    h("section", { class: "panel" }, h("h2", {}, "Recipes"), diffView(a.recipe, b.recipe)),
    h("section", { class: "panel" }, h("h2", {}, "Change from the base, per layer"),
      h("div", { class: "row" }, h("label", {}, "Base", baseInput),
        h("button", { type: "button", id: "compute-changes", onclick: () => changeView(a, b, baseInput.value.trim(), changes) }, "Compute")),
      changes));
  if (baseInput.value) changeView(a, b, baseInput.value, changes);
}
