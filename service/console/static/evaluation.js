// Evaluation views of a job's ``evaluation`` report: a greedy soup's ingredients with their
// scores and kept/rejected decisions, or an evaluated merge against each of its inputs.
"use strict";

import { barChart, scoreChart } from "./plots.js";
import { h, score } from "./render.js";

function short(reference) { return reference.split("/").filter(Boolean).pop() || reference; }

/** The greedy soup: ingredients in the order tried, each one's own score and its decision. */
export function soupView(report) {
  const byReference = new Map(report.ingredients.map((item) => [item.reference, item]));
  const steps = new Map(report.steps.map((step) => [step.ingredient, step]));
  const kept = new Set(report.kept);
  const points = [];
  const line = [];
  let best = null;
  report.order.forEach((reference, index) => {
    const own = byReference.get(reference);
    points.push({ x: index, y: own ? own.score : NaN, kind: "ingredient", title: `${reference} alone` });
    const step = steps.get(reference);
    if (index === 0) best = own ? own.score : null;
    else if (step) {
      points.push({ x: index, y: step.candidate_score, kind: step.kept ? "kept" : "rejected",
        title: `soup + ${reference}` });
      if (step.kept) best = step.candidate_score;
    }
    line.push(best === null ? NaN : best);
  });
  const rows = report.order.map((reference, index) => {
    const own = byReference.get(reference) || {};
    const step = steps.get(reference);
    const decision = kept.has(reference) ? "kept" : "rejected";
    return h("tr", { class: decision },
      h("td", { class: "num" }, index + 1), h("td", { class: "mono" }, reference),
      h("td", { class: "num" }, score(own.score)),
      h("td", { class: "num" }, step ? score(step.candidate_score) : index === 0 ? "(first)" : "–"),
      h("td", { class: decision === "kept" ? "ok" : "error" }, decision));
  });
  return h("section", { class: "panel", id: "soup" },
    h("h2", {}, "Greedy soup"),
    h("p", {}, `Evaluator ${report.evaluator} (${report.higher_is_better ? "higher" : "lower"} is better), `,
      `keep rule ${report.keep_rule}: soup ${score(report.soup_score)} vs. best single `,
      `${score(report.best_single && report.best_single.score)} after ${report.evaluations} evaluations.`),
    scoreChart({ points, line, labels: report.order.map(short), yTitle: report.evaluator }),
    h("p", { class: "muted" }, "Grey: each ingredient alone; green/red: the soup with it added, kept or rejected; line: the soup's score."),
    h("table", {}, h("tr", {}, h("th", { class: "num" }, "#"), h("th", {}, "ingredient"),
      h("th", { class: "num" }, "alone"), h("th", { class: "num" }, "soup with it"), h("th", {}, "decision")), rows));
}

/** An evaluated merge: the merge's score next to each input's. */
export function mergeScoresView(report) {
  const rows = [...report.inputs.map((input) => ({ label: input.reference, role: input.role, score: input.score, metrics: input.metrics })),
    { label: `${report.method} merge`, role: "merge", score: report.merge.score, metrics: report.merge.metrics }];
  const metricNames = [...new Set(rows.flatMap((row) => Object.keys(row.metrics || {})))];
  return h("section", { class: "panel", id: "merge-scores" },
    h("h2", {}, "Evaluation"),
    h("p", {}, `Evaluator ${report.evaluator} (${report.higher_is_better ? "higher" : "lower"} is better): `,
      report.beats_best_input ? "the merge beats its best input." : "the merge does not beat its best input."),
    barChart(rows.map((row) => ({ label: row.label, value: row.score, highlight: row.role === "merge" }))),
    h("table", {}, h("tr", {}, h("th", {}, "model"), h("th", {}, "role"), h("th", { class: "num" }, "score"),
      metricNames.map((name) => h("th", { class: "num" }, name))),
    rows.map((row) => h("tr", {}, h("td", { class: "mono" }, row.label), h("td", {}, row.role),
      h("td", { class: "num" }, score(row.score)),
      metricNames.map((name) => h("td", { class: "num" }, score((row.metrics || {})[name])))))));
}

/** A search: the score of each evaluation and the best so far, the best point and recipe. */
export function searchView(report) {
  const higher = report.higher_is_better;
  const points = [];
  const line = [];
  let best = null;
  report.evaluations.forEach((row, index) => {
    const value = row.score === null ? NaN : row.score;
    const better = Number.isFinite(value) && (best === null || (higher ? value > best : value < best));
    if (better) best = value;
    points.push({ x: index, y: value, kind: better ? "kept" : "ingredient",
      title: Object.entries(row.point).map(([name, v]) => `${name}=${v}`).join(" ") });
    line.push(best === null ? NaN : best);
  });
  const names = report.dimensions.map((dimension) => dimension.name);
  const rows = report.evaluations.map((row) => h("tr", { class: row.index === report.best.index ? "kept" : "" },
    h("td", { class: "num" }, row.index + 1),
    names.map((name) => h("td", { class: "num" }, score(row.point[name]))),
    h("td", { class: "num" }, row.score === null ? row.error || "failed" : score(row.score))));
  return h("section", { class: "panel", id: "search" },
    h("h2", {}, "Search"),
    h("p", {}, `${report.strategy.name} search, seed ${report.seed}, evaluator ${report.evaluator} `,
      `(${higher ? "higher" : "lower"} is better): best ${score(report.best.score)} at evaluation `,
      `${report.best.index + 1} of ${report.evaluations.length} (stopped by ${report.stopped_by}); `,
      `written ${score(report.written_validation_score)}`,
      report.test ? `, test ${score(report.test.score)}.` : "."),
    scoreChart({ points, line, labels: report.evaluations.map((row) => String(row.index + 1)), yTitle: report.evaluator }),
    h("p", { class: "muted" }, "Dots: each evaluation's score (green: a new best); line: the best so far."),
    h("table", { id: "search-evaluations" }, h("tr", {}, h("th", { class: "num" }, "#"),
      names.map((name) => h("th", { class: "num" }, name)), h("th", { class: "num" }, "score")), rows),
    h("h3", {}, "Best recipe"), h("pre", { id: "best-recipe" }, report.best_recipe));
}

/** Whatever the report is: a soup, an evaluated merge, or a list of them. */
export function evaluationView(report) {
  if (Array.isArray(report)) return h("div", {}, report.map(evaluationView));
  if (report && report.ingredients && report.steps) return soupView(report);
  if (report && report.evaluations && report.best_recipe) return searchView(report);
  if (report && report.inputs && report.merge) return mergeScoresView(report);
  return h("section", { class: "panel" }, h("h2", {}, "Evaluation"), h("pre", {}, JSON.stringify(report, null, 2)));
}

/** The final score a report gives its merge, if any (for the compare view). */
export function finalScore(report) {
  if (!report) return null;
  if (report.soup_score !== undefined) return report.soup_score;
  if (report.merge) return report.merge.score;
  return null;
}
