// Plots drawn by the page as SVG: a score chart (greedy soups), bars (an evaluated merge
// against its inputs) and a heat strip (per-layer change, in the compare view).
"use strict";

import { h, s, score } from "./render.js";

const WIDTH = 640;
const PAD = { left: 56, right: 16, top: 26, bottom: 34 };

function extent(values) {
  const finite = values.filter((value) => Number.isFinite(value));
  if (!finite.length) return [0, 1];
  let low = Math.min(...finite);
  let high = Math.max(...finite);
  if (low === high) { low -= Math.abs(low) * 0.05 || 0.5; high += Math.abs(high) * 0.05 || 0.5; }
  const margin = (high - low) * 0.08;
  return [low - margin, high + margin];
}

/**
 * A score chart. ``points``: [{x (index), y, kind}] where kind names a class
 * (ingredient, kept, rejected); ``line``: [y per x] drawn as a step line; ``labels``: x labels.
 */
export function scoreChart({ points, line, labels, yTitle }) {
  const height = 260;
  const [low, high] = extent([...points.map((point) => point.y), ...(line || [])]);
  const count = Math.max(labels.length, 1);
  const x = (index) => PAD.left + ((index + 0.5) * (WIDTH - PAD.left - PAD.right)) / count;
  const y = (value) => PAD.top + ((high - value) * (height - PAD.top - PAD.bottom)) / (high - low);
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${height}`, width: "100%", role: "img", class: "chart" });
  for (let tick = 0; tick <= 4; tick += 1) {
    const value = low + ((high - low) * tick) / 4;
    svg.append(s("line", { x1: PAD.left, x2: WIDTH - PAD.right, y1: y(value), y2: y(value), stroke: "#e3e6ea" }),
      s("text", { x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" }, score(value)));
  }
  labels.forEach((label, index) => {
    svg.append(s("text", { x: x(index), y: height - PAD.bottom + 16, "text-anchor": "middle" }, label));
  });
  svg.append(s("text", { x: PAD.left, y: 12, class: "axis-title" }, yTitle || "score"));
  if (line && line.length) {
    const path = line.map((value, index) => (Number.isFinite(value) ? `${index ? "L" : "M"}${x(index)},${y(value)}` : ""))
      .join(" ");
    svg.append(s("path", { d: path, fill: "none", stroke: "#2458b3", "stroke-width": 2 }));
  }
  const colors = { ingredient: "#9aa3ad", kept: "#1f7a3d", rejected: "#b3261e" };
  for (const point of points) {
    if (!Number.isFinite(point.y)) continue;
    svg.append(s("circle", { cx: x(point.x), cy: y(point.y), r: point.kind === "ingredient" ? 4 : 6,
      fill: colors[point.kind] || "#2458b3", class: `point ${point.kind}` },
    s("title", {}, `${point.title}: ${score(point.y)}`)));
  }
  return svg;
}

/** Horizontal bars: [{label, value, highlight}]. */
export function barChart(rows) {
  const rowHeight = 24;
  const height = PAD.top + rows.length * rowHeight + 8;
  const values = rows.map((row) => row.value).filter((value) => Number.isFinite(value));
  const high = Math.max(...values.map(Math.abs), 1e-12);
  const left = 220;
  const width = (value) => (Math.abs(value) / high) * (WIDTH - left - 80);
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${height}`, width: "100%", role: "img", class: "chart" });
  rows.forEach((row, index) => {
    const top = PAD.top + index * rowHeight;
    svg.append(s("text", { x: left - 8, y: top + 15, "text-anchor": "end" }, row.label.slice(-34)));
    if (Number.isFinite(row.value)) {
      svg.append(s("rect", { x: left, y: top + 3, width: Math.max(width(row.value), 1), height: rowHeight - 8,
        fill: row.highlight ? "#2458b3" : "#9aa3ad", class: "bar" }, s("title", {}, `${row.label}: ${score(row.value)}`)),
      s("text", { x: left + width(row.value) + 6, y: top + 15 }, score(row.value)));
    }
  });
  return svg;
}

/** Color for ``value`` in [0, high]: white to the accent blue. */
function heat(value, high) {
  if (!Number.isFinite(value)) return "#eeeeee";
  const t = high > 0 ? Math.min(value / high, 1) : 0;
  const mix = (from, to) => Math.round(from + (to - from) * t);
  return `rgb(${mix(255, 20)},${mix(255, 70)},${mix(255, 160)})`;
}

/** A heat strip per row: rows [{label, cells: [{label, value}]}], one shared color scale. */
export function heatStrip(rows) {
  const left = 120;
  const rowHeight = 28;
  const columns = Math.max(...rows.map((row) => row.cells.length), 1);
  const cell = (WIDTH - left - PAD.right) / columns;
  const high = Math.max(...rows.flatMap((row) => row.cells.map((c) => c.value)).filter(Number.isFinite), 0);
  const height = PAD.top + rows.length * rowHeight + 24;
  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${height}`, width: "100%", role: "img", class: "heat" });
  rows.forEach((row, index) => {
    const top = PAD.top + index * rowHeight;
    svg.append(s("text", { x: left - 8, y: top + 17, "text-anchor": "end" }, row.label));
    row.cells.forEach((item, column) => {
      svg.append(s("rect", { x: left + column * cell, y: top, width: Math.max(cell - 1, 1), height: rowHeight - 4,
        fill: heat(item.value, high), class: "cell" }, s("title", {}, `${row.label} ${item.label}: ${score(item.value)}`)));
    });
  });
  const labels = rows[0] ? rows[0].cells : [];
  const every = Math.max(1, Math.ceil(labels.length / 16));
  labels.forEach((item, column) => {
    if (column % every === 0) {
      svg.append(s("text", { x: left + (column + 0.5) * cell, y: height - 8, "text-anchor": "middle" }, item.label));
    }
  });
  return h("figure", {}, svg,
    h("figcaption", { class: "muted" }, `Relative L2 change to the base, per layer; darkest = ${score(high)}.`));
}
