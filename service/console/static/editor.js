// The recipe editor: YAML on the left; on the right the live plan (POST /v1/plans as you
// type), the method's parameters from its JSON Schema (GET /v1/methods), and a picker of
// checkpoint folders inside the allowed roots (GET /v1/roots).
"use strict";

import { ApiError, getJson, sendJson } from "./api.js";
import { bytes, h, stats } from "./render.js";

const DRAFT_KEY = "tureen-draft";
const TEMPLATE = `# A mergekit-style recipe (paste a mergekit config as it is). Local paths are relative
# to the inputs folder or absolute inside an allowed root: the picker inserts them.
merge_method: ties
base_model: ./BASE
models:
  - model: ./MODEL_A
    parameters: {weight: 0.5, density: 0.5}
  - model: ./MODEL_B
    parameters: {weight: 0.5, density: 0.5}
dtype: float32
# output: {name: my-merge}
`;
const PLAN_DELAY_MS = 350;

let methodsCache = null;
async function methods() {
  if (!methodsCache) methodsCache = await getJson("/v1/methods");
  return methodsCache;
}

/** Put ``text`` in the editor the next time it opens (the job page's "edit a copy"). */
export function setDraft(text) { sessionStorage.setItem(DRAFT_KEY, text); }

function methodOf(text) {
  const match = text.match(/^merge_method:\s*["']?([\w-]+)/m);
  return match ? match[1] : null;
}

function typeOf(schema) {
  if (!schema) return "";
  if (schema.type) return Array.isArray(schema.type) ? schema.type.join(" | ") : schema.type;
  if (schema.$ref) return schema.$ref.split("/").pop();
  const options = schema.anyOf || schema.oneOf;
  return options ? [...new Set(options.map(typeOf))].join(" | ") : "";
}

function parameterTable(title, schema) {
  const properties = Object.entries((schema && schema.properties) || {});
  if (!properties.length) return h("p", { class: "muted" }, `${title}: none.`);
  return h("div", {},
    h("h3", {}, title),
    h("table", {}, h("tr", {}, h("th", {}, "name"), h("th", {}, "type"), h("th", {}, "default")),
      properties.map(([name, property]) => [
        h("tr", {}, h("td", {}, h("code", {}, name)), h("td", {}, typeOf(property)),
          h("td", {}, "default" in property ? JSON.stringify(property.default) : "required")),
        property.description
          ? h("tr", {}, h("td", { colspan: 3, class: "muted" }, property.description)) : null,
      ])));
}

function methodPanel(all, name) {
  const spec = all.find((method) => method.name === name);
  if (!spec) {
    return h("div", {}, h("p", { class: "warn" }, name ? `No method named ${name}.` : "No merge_method yet."),
      h("p", { class: "muted" }, `Methods: ${all.map((method) => method.name).join(", ")}`));
  }
  return h("div", {},
    h("p", {}, h("strong", {}, spec.title || spec.name), spec.paper ? ` — ${spec.paper}` : ""),
    h("p", { class: "muted" }, spec.description || ""),
    h("p", { class: "muted" }, `Models: ${spec.min_models}${spec.max_models ? `–${spec.max_models}` : "+"}`,
      spec.needs_base ? "; needs base_model" : "", spec.needs_evaluation ? "; needs an evaluator" : ""),
    parameterTable("Recipe parameters", spec.parameters),
    parameterTable("Per-model parameters", spec.model_parameters));
}

function planSummary(plan) {
  const read = plan.inputs.reduce((sum, input) => sum + input.bytes, 0);
  return h("div", {},
    stats([
      ["method", plan.merge_method],
      ["inputs", String(plan.inputs.length)],
      ["tensors", String(plan.output.tensors)],
      ["bytes to read", bytes(read)],
      ["bytes to write", bytes(plan.output.bytes)],
      ["shards", String(plan.output.shards.length)],
      ["peak memory (estimate)", bytes(plan.peak_memory_bytes_estimate)],
    ]),
    h("table", {}, h("tr", {}, h("th", {}, "role"), h("th", {}, "input"), h("th", { class: "num" }, "tensors"),
      h("th", { class: "num" }, "bytes")),
    plan.inputs.map((input) => h("tr", {}, h("td", {}, input.role), h("td", { class: "mono" }, input.reference),
      h("td", { class: "num" }, input.tensors), h("td", { class: "num" }, bytes(input.bytes))))),
    list("warn", "Warnings", plan.warnings), list("muted", "Notes", plan.notes),
    list("error", "Problems", plan.problems));
}

function list(className, title, items) {
  if (!items || !items.length) return null;
  return h("div", { class: className }, h("strong", {}, title),
    h("ul", {}, items.map((item) => h("li", {}, item))));
}

/** A plan error, every problem named: the field, the message, then each listed problem. */
export function errorPanel(error) {
  if (!(error instanceof ApiError)) return h("p", { class: "error" }, String(error));
  const details = error.details || {};
  return h("div", { class: "plan-error", "data-code": error.code },
    h("p", { class: "error" }, h("strong", {}, `${error.code} (HTTP ${error.status})`),
      details.field ? ` in ${details.field}` : ""),
    h("p", { class: "error" }, error.message),
    list("error", "Problems", details.problems), list("error", "Errors", details.errors));
}

function planView(report) {
  if (report.stages) {
    return h("div", {}, h("p", { class: "ok" }, `Plan OK: ${report.stages.length} merges`),
      list("warn", "Warnings", report.warnings),
      report.stages.map((stage) => h("div", {},
        h("h3", {}, stage.name || `merges[${stage.index}]`, stage.final ? " (final)" : ""),
        stage.plan ? planSummary(stage.plan)
          : h("p", { class: "muted" }, `Planned when it runs: reads ${stage.reads.join(", ")}`))));
  }
  return h("div", {}, h("p", { class: "ok" }, "Plan OK"), planSummary(report));
}

async function pickerPanel(insert) {
  const body = h("div", { class: "picker" });
  const panel = h("section", { class: "panel" }, h("h2", {}, "Checkpoints"), body);
  const roots = await getJson("/v1/roots");
  async function open(root, path) {
    body.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      const listing = await getJson(`/v1/roots/${root.index}/entries?path=${encodeURIComponent(path)}`);
      const up = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : "";
      body.replaceChildren(
        h("p", {}, h("button", { class: "linklike", type: "button", onclick: () => showRoots() }, "roots"),
          ` / ${root.name}${path ? `/${path}` : ""}`),
        h("ul", {},
          path ? h("li", {}, h("button", { class: "linklike", type: "button", onclick: () => open(root, up) }, "..")) : null,
          listing.entries.filter((entry) => entry.kind === "folder").map((entry) => h("li", {},
            h("button", { class: "linklike", type: "button", onclick: () => open(root, path ? `${path}/${entry.name}` : entry.name) },
              `${entry.name}/`),
            entry.checkpoint ? [" ", h("button", { type: "button", "data-reference": entry.reference,
              onclick: () => insert(entry.reference) }, "insert")] : null))),
        listing.truncated ? h("p", { class: "muted" }, "(more entries not shown)") : "");
    } catch (error) { body.replaceChildren(errorPanel(error)); }
  }
  function showRoots() {
    body.replaceChildren(h("ul", {}, roots.map((root) => h("li", {},
      h("button", { class: "linklike", type: "button", onclick: () => open(root, "") }, root.name)))));
  }
  showRoots();
  return panel;
}

function importDialog(onImport) {
  const area = h("textarea", { id: "import-text", spellcheck: "false", placeholder: "Paste a mergekit YAML config" });
  const dialog = h("dialog", {},
    h("h2", {}, "Import a mergekit config"),
    h("p", { class: "muted" }, "tureen reads mergekit's config language as it is: paste the YAML; it replaces the editor's text and is planned at once."),
    area,
    h("div", { class: "row" },
      h("button", { class: "primary", type: "button", onclick: () => { onImport(area.value); dialog.close(); } }, "Import"),
      h("button", { type: "button", onclick: () => dialog.close() }, "Cancel")));
  return dialog;
}

/** The editor view. */
export async function editorView(root, navigate) {
  const all = await methods();
  const text = h("textarea", { id: "recipe", spellcheck: "false", "aria-label": "Recipe (YAML)" });
  text.value = sessionStorage.getItem(DRAFT_KEY) || TEMPLATE;
  const planBox = h("div", { id: "plan" }, h("p", { class: "muted" }, "Planning…"));
  const methodBox = h("div", { id: "method" });
  const submitStatus = h("span", { id: "submit-status" });
  const submit = h("button", { class: "primary", type: "button", id: "submit" }, "Submit merge");
  let timer = null;
  let sequence = 0;

  async function plan() {
    const mine = ++sequence;
    sessionStorage.setItem(DRAFT_KEY, text.value);
    methodBox.replaceChildren(methodPanel(all, methodOf(text.value)));
    planBox.setAttribute("aria-busy", "true");
    let view;
    try {
      view = planView(await sendJson("POST", "/v1/plans", { body: text.value, type: "application/yaml" }));
    } catch (error) { view = errorPanel(error); }
    if (mine !== sequence) return; // an older answer: a newer plan is on its way
    planBox.replaceChildren(view);
    planBox.removeAttribute("aria-busy");
  }
  function schedule() { clearTimeout(timer); timer = setTimeout(plan, PLAN_DELAY_MS); }
  function insert(reference) {
    text.setRangeText(reference, text.selectionStart, text.selectionEnd, "end");
    text.focus();
    schedule();
  }
  text.addEventListener("input", schedule);
  text.addEventListener("keydown", (event) => {
    if (event.key === "Tab") { event.preventDefault(); text.setRangeText("  ", text.selectionStart, text.selectionEnd, "end"); }
  });
  submit.addEventListener("click", async () => {
    submit.disabled = true;
    submitStatus.textContent = "Submitting…";
    try {
      const job = await sendJson("POST", "/v1/merges", { body: text.value, type: "application/yaml" });
      navigate(`#/merges/${job.id}`);
    } catch (error) {
      submitStatus.replaceChildren(errorPanel(error));
      submit.disabled = false;
    }
  });
  const dialog = importDialog((pasted) => { text.value = pasted; plan(); });
  root.replaceChildren(
    h("h1", {}, "New merge"),
    h("div", { class: "editor" },
      h("div", {}, text,
        h("div", { class: "row" }, submit,
          h("button", { type: "button", onclick: () => dialog.showModal() }, "Import mergekit config"),
          h("button", { type: "button", onclick: () => { text.value = TEMPLATE; plan(); } }, "Reset")),
        submitStatus),
      h("div", {},
        h("section", { class: "panel" }, h("h2", {}, "Plan"), planBox),
        await pickerPanel(insert),
        h("section", { class: "panel" }, h("h2", {}, "Method"), methodBox))),
    dialog);
  plan();
}
