// One job's page: status and live progress (SSE), cancel, log, output files with downloads,
// the model card, evaluation views and publishing to the Hub.
"use strict";

import { download, follow, getJson, getText, sendJson } from "./api.js";
import { errorPanel, setDraft } from "./editor.js";
import { evaluationView } from "./evaluation.js";
import { badge, bytes, compact, h, markdown, seconds, stats, when, yaml } from "./render.js";

const LOG_REFRESH_MS = 2000;

function progressLine(job) {
  const p = job.progress || {};
  const parts = [p.phase];
  if (p.stage) parts.push(`stage ${p.stage}`);
  if (p.steps_total) parts.push(`${p.steps_done || 0}/${p.steps_total} steps`);
  if (p.evaluations_total) parts.push(`${p.evaluations_done || 0}/${p.evaluations_total} evaluations`);
  if (p.best_score !== null && p.best_score !== undefined) parts.push(`best ${p.best_score.toFixed(4)}`);
  if (p.loss !== null && p.loss !== undefined) parts.push(`loss ${p.loss.toFixed(4)}`);
  if (p.tensors_total) parts.push(`${p.tensors_done}/${p.tensors_total} tensors`);
  if (p.bytes_total) parts.push(`${bytes(p.bytes_done)} of ${bytes(p.bytes_total)}`);
  if (p.eta_seconds !== null && p.eta_seconds !== undefined && !["succeeded", "failed", "cancelled"].includes(job.status)) {
    parts.push(`ETA ${seconds(p.eta_seconds)}`);
  }
  if (p.current) parts.push(p.current);
  return parts.filter(Boolean).join(" · ");
}

function progressFraction(job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return 1;
  if (p.bytes_total) return p.bytes_done / p.bytes_total;
  if (p.tensors_total) return p.tensors_done / p.tensors_total;
  if (p.steps_total) return (p.steps_done || 0) / p.steps_total;
  if (p.evaluations_total) return (p.evaluations_done || 0) / p.evaluations_total;
  return 0;
}

function publishPanel(job, base, refresh) {
  const state = job.publish;
  const repo = h("input", { id: "publish-repo", placeholder: "namespace/name", value: state ? state.options.repo_id : "" });
  const hubToken = h("input", { id: "publish-token", type: "password", autocomplete: "off", placeholder: "hf_… (default: the server's)" });
  const isPrivate = h("input", { type: "checkbox", checked: !state || state.options.private !== false });
  const asPr = h("input", { type: "checkbox" });
  const revision = h("input", { placeholder: "main" });
  const message = h("input", { placeholder: "default: names the job and method" });
  const status = h("div", { id: "publish-status" });
  if (state) {
    status.append(stats([["state", state.state], ["step", state.step || undefined], ["attempts", String(state.attempts)],
      ["commit", state.commit_url ? h("a", { href: state.commit_url, rel: "noopener noreferrer" }, state.commit_url) : undefined],
      ["pull request", state.pr_url ? h("a", { href: state.pr_url, rel: "noopener noreferrer" }, state.pr_url) : undefined]]));
    if (state.error) status.append(h("p", { class: "error" }, `${state.error.code}: ${state.error.message}`));
  }
  const button = h("button", { class: "primary", type: "button", id: "publish" }, "Publish");
  button.addEventListener("click", async () => {
    const options = { repo_id: repo.value.trim(), private: isPrivate.checked, create_pr: asPr.checked };
    if (revision.value.trim()) options.revision = revision.value.trim();
    if (message.value.trim()) options.commit_message = message.value.trim();
    // The Hub token goes in this one request's header; the page keeps no copy of it.
    const extraHeaders = hubToken.value ? { "X-HF-Token": hubToken.value } : {};
    hubToken.value = "";
    button.disabled = true;
    try {
      await sendJson("POST", `${base}/publish`, { body: options, extraHeaders });
      refresh();
    } catch (error) {
      status.replaceChildren(errorPanel(error));
      button.disabled = false;
    }
  });
  return h("section", { class: "panel", id: "publish-panel" }, h("h2", {}, "Publish to the Hugging Face Hub"),
    h("div", { class: "row" }, h("label", {}, "Repository", repo), h("label", {}, "Hub token", hubToken)),
    h("div", { class: "row" }, h("label", {}, isPrivate, "private (new repository)"), h("label", {}, asPr, "open a pull request"),
      h("label", {}, "Branch", revision), h("label", {}, "Message", message)),
    h("div", { class: "row" }, button,
      h("span", { class: "muted" }, "The token is sent with this request only and never stored.")),
    status);
}

async function filesPanel(base) {
  const listing = await getJson(`${base}/files`);
  const rows = listing.files.map((file) => {
    const path = `${base}/files/${file.name.split("/").map(encodeURIComponent).join("/")}`;
    const link = h("a", { href: path, class: "download", "data-file": file.name }, "download");
    link.addEventListener("click", (event) => {
      event.preventDefault();
      download(path, file.name.split("/").pop()).catch((error) => link.replaceWith(errorPanel(error)));
    });
    return h("tr", {}, h("td", { class: "mono" }, file.name), h("td", { class: "num" }, bytes(file.bytes)), h("td", {}, link));
  });
  const total = listing.files.reduce((sum, file) => sum + file.bytes, 0);
  const panel = h("section", { class: "panel", id: "files" }, h("h2", {}, `Files (${bytes(total)})`),
    h("table", {}, h("tr", {}, h("th", {}, "file"), h("th", { class: "num" }, "size"), h("th", {}, "")), rows));
  const card = listing.files.find((file) => file.name === "README.md");
  let cardPanel = null;
  if (card) {
    const text = await getText(`${base}/files/README.md`);
    cardPanel = h("section", { class: "panel", id: "model-card" }, h("h2", {}, "Model card"), markdown(text));
  }
  return [panel, cardPanel];
}

const TITLES = { merges: "Merge ", trainings: "Training ", searches: "Search " };

/** The page of job ``id``; ``kind`` is "merges", "trainings" or "searches". Returns a cleanup function. */
export async function jobView(root, navigate, kind, id) {
  const base = `/v1/${kind}/${encodeURIComponent(id)}`;
  let stop = () => {};
  let logTimer = null;
  const logBox = h("pre", { id: "log" }, "");
  async function refreshLog() {
    try { logBox.textContent = (await getText(`${base}/log`)) || "(nothing logged yet)"; } catch (error) { logBox.textContent = String(error); }
  }

  async function render(job) {
    const finished = ["succeeded", "failed", "cancelled"].includes(job.status);
    const bar = h("progress", { id: "progress", max: 1, value: progressFraction(job) });
    const line = h("p", { id: "progress-text" }, progressLine(job));
    const statusBadge = h("span", { id: "status" }, badge(job.status));
    const cancel = finished ? null : h("button", { class: "danger", type: "button", id: "cancel", onclick: async () => {
      try { render(await sendJson("DELETE", base)); } catch (error) { line.replaceChildren(errorPanel(error)); }
    } }, "Cancel");
    // Searches pause between evaluations and resume where they were (their state is kept).
    const pauseOrResume = kind !== "searches" || finished ? null
      : h("button", { type: "button", id: job.status === "paused" ? "resume" : "pause", onclick: async () => {
        try { await sendJson("POST", `${base}/${job.status === "paused" ? "resume" : "pause"}`); start(); } catch (error) { line.replaceChildren(errorPanel(error)); }
      } }, job.status === "paused" ? "Resume" : "Pause");
    const document = kind === "merges" ? job.recipe : kind === "searches" ? job.spec : job.config;
    const sections = [
      h("h1", {}, TITLES[kind], h("span", { class: "mono" }, job.id), " ", statusBadge),
      h("div", { class: "row" }, cancel, pauseOrResume,
        kind === "merges" ? h("button", { type: "button", onclick: () => { setDraft(yaml(compact(job.recipe)) + "\n"); navigate("#/new"); } }, "Edit a copy") : null,
        kind === "merges" && job.status === "succeeded" ? h("a", { href: `#/compare?a=${encodeURIComponent(job.id)}` }, "Compare with another merge") : null),
      h("section", { class: "panel" }, bar, line),
      job.error ? h("section", { class: "panel error", id: "job-error" }, h("strong", {}, job.error.code), ": ", job.error.message) : null,
      stats([["created", when(job.created_at)], ["started", when(job.started_at)], ["finished", when(job.finished_at)],
        ["attempts", String(job.attempts)],
        ["merge time", job.merge_seconds !== undefined && job.merge_seconds !== null ? seconds(job.merge_seconds) : undefined],
        ["bytes written", job.bytes_written ? bytes(job.bytes_written) : undefined],
        ["adapter", job.adapter_reference || undefined]]),
      job.warnings && job.warnings.length ? h("div", { class: "warn" }, h("strong", {}, "Warnings"), h("ul", {}, job.warnings.map((w) => h("li", {}, w)))) : null,
      job.held_out ? h("section", { class: "panel" }, h("h2", {}, "Held-out numbers"), h("pre", {}, yaml(job.held_out))) : null,
      job.evaluation ? evaluationView(job.evaluation) : null,
      job.report ? evaluationView(job.report) : null,
    ];
    if (job.stages) {
      sections.push(h("section", { class: "panel" }, h("h2", {}, "Stages"),
        h("table", {}, job.stages.map((stage) => h("tr", {}, h("td", {}, stage.name || `merges[${stage.index}]`),
          h("td", {}, badge(stage.state)), h("td", {}, progressLine({ status: stage.state, progress: stage.progress })))))));
    }
    if (job.status === "succeeded") {
      try { sections.push(...await filesPanel(base)); } catch (error) { sections.push(errorPanel(error)); }
    }
    if (kind !== "trainings" && (job.status === "succeeded" || job.status === "publishing")) sections.push(publishPanel(job, base, start));
    sections.push(h("section", { class: "panel" }, h("h2", {}, { merges: "Recipe", trainings: "Config", searches: "Search spec" }[kind]), h("pre", { id: "recipe-text" }, yaml(compact(document)))),
      h("section", { class: "panel" }, h("h2", {}, "Log ", h("button", { type: "button", onclick: refreshLog }, "Refresh")), logBox));
    root.replaceChildren(...sections.filter(Boolean));
    refreshLog();
    return { bar, line, statusBadge };
  }

  async function start() {
    stop();
    clearInterval(logTimer);
    const job = await getJson(base);
    const view = await render(job);
    if (["succeeded", "failed", "cancelled"].includes(job.status)) return;
    logTimer = setInterval(refreshLog, LOG_REFRESH_MS);
    stop = follow(`${base}/events`, (event, data) => {
      if (event === "progress") {
        const partial = { status: data.status, progress: data.progress };
        view.bar.value = progressFraction(partial);
        view.line.textContent = progressLine(partial);
        view.statusBadge.replaceChildren(badge(data.status));
      } else if (event === "status") {
        clearInterval(logTimer);
        render(data);
      }
    }, (error) => { if (error) view.line.replaceChildren(errorPanel(error)); });
  }

  await start();
  return () => { stop(); clearInterval(logTimer); };
}

