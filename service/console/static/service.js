// The service view: readiness (GET /readyz) and the Prometheus metrics (GET /metrics) as
// tables, so what the curl session reads from the service is one click away here too.
"use strict";

import { getJson, getText } from "./api.js";
import { h, stats } from "./render.js";

/** Prometheus text exposition lines as [name, labels, value] rows (comments skipped). */
export function parseMetrics(text) {
  const rows = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = /^([A-Za-z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$/.exec(line.trim());
    if (match) rows.push([match[1], (match[2] || "").slice(1, -1), match[3]]);
  }
  return rows;
}

export async function serviceView(view) {
  const [ready, metrics] = await Promise.all([getJson("/readyz"), getText("/metrics")]);
  const checks = Object.entries(ready.checks || {}).map(([name, ok]) => [name, ok ? "ok" : "failing"]);
  const body = h("tbody", {});
  for (const [name, labels, value] of parseMetrics(metrics)) {
    body.append(h("tr", {}, h("td", {}, name), h("td", {}, labels), h("td", { class: "num" }, value)));
  }
  view.replaceChildren(
    h("h1", {}, "Service"),
    h("section", { class: "panel", id: "readiness" },
      h("h2", {}, "Readiness"), stats([["status", ready.status], ...checks])),
    h("section", { class: "panel" },
      h("h2", {}, "Metrics"),
      h("table", { id: "metrics" },
        h("thead", {}, h("tr", {}, h("th", {}, "metric"), h("th", {}, "labels"), h("th", {}, "value"))),
        body)));
}
