// DOM building, number formats, a YAML writer, a small Markdown renderer and SVG helpers.
// Text always goes in as text nodes (never innerHTML), so nothing from the API can inject
// markup, and no style attribute is ever written (the page's policy forbids inline styles).
"use strict";

/** h("td", {class: "num", onclick: f}, "text", node, ...): an element. */
export function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "class") node.className = value;
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const SVG = "http://www.w3.org/2000/svg";
/** An SVG element with attributes (presentation attributes, never style). */
export function s(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value !== undefined && value !== null) node.setAttribute(key, String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let size = value;
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) { size /= 1000; unit += 1; }
  return `${unit ? size.toFixed(size < 10 ? 2 : 1) : size} ${units[unit]}`;
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 60) return `${value.toFixed(value < 10 ? 1 : 0)} s`;
  const minutes = Math.floor(value / 60);
  if (minutes < 60) return `${minutes} min ${Math.round(value % 60)} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function when(text) {
  if (!text) return "–";
  const date = new Date(text);
  return Number.isNaN(date.getTime()) ? text : date.toLocaleString();
}

export function score(value) {
  return value === null || value === undefined ? "–" : Number(value).toPrecision(5);
}

export function badge(status) { return h("span", { class: `badge ${status}` }, status); }

/** A mapping as a definition grid: [[label, value], ...], rows with undefined skipped. */
export function stats(rows) {
  const list = h("dl", { class: "stats" });
  for (const [label, value] of rows) {
    if (value === undefined) continue;
    list.append(h("dt", {}, label), h("dd", {}, value));
  }
  return list;
}

// -- YAML (enough for recipes: mappings, lists, scalars) ------------------------------------

function scalar(value) {
  if (value === null) return "null";
  if (typeof value === "string") {
    return /^[\w./+:@-][\w ./+:@-]*$/.test(value) && !/^(true|false|null|yes|no|~|[-\d.]+)$/i.test(value)
      && !value.endsWith(" ") ? value : JSON.stringify(value);
  }
  return String(value);
}

/** ``value`` without its null entries (a validated recipe spells out every default). */
export function compact(value) {
  if (Array.isArray(value)) return value.map(compact);
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).filter(([, item]) => item !== null)
      .map(([key, item]) => [key, compact(item)]));
  }
  return value;
}

/** ``value`` as YAML text (block style). */
export function yaml(value, indent = "") {
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return value.map((item) => {
      const text = isBlock(item) ? yaml(item, indent + "  ").trimStart() : scalar(item);
      return `${indent}- ${text}`;
    }).join("\n");
  }
  if (value && typeof value === "object") {
    const entries = Object.entries(value);
    if (!entries.length) return "{}";
    return entries.map(([key, item]) => {
      if (isBlock(item)) {
        const nested = Array.isArray(item) ? yaml(item, indent) : yaml(item, indent + "  ");
        return `${indent}${scalar(key)}:\n${nested}`;
      }
      return `${indent}${scalar(key)}: ${Array.isArray(item) ? "[]" : isEmpty(item) ? "{}" : scalar(item)}`;
    }).join("\n");
  }
  return indent + scalar(value);
}

function isEmpty(value) { return value && typeof value === "object" && !Object.keys(value).length; }
function isBlock(value) { return value && typeof value === "object" && !isEmpty(value); }

// -- line diff (longest common subsequence; recipes are short) -------------------------------

/** [{op: " " | "-" | "+", text}] turning ``left`` lines into ``right`` lines. */
export function diffLines(left, right) {
  const a = left.split("\n");
  const b = right.split("\n");
  const table = Array.from({ length: a.length + 1 }, () => new Int32Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i -= 1) {
    for (let j = b.length - 1; j >= 0; j -= 1) {
      table[i][j] = a[i] === b[j] ? table[i + 1][j + 1] + 1 : Math.max(table[i + 1][j], table[i][j + 1]);
    }
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) { out.push({ op: " ", text: a[i] }); i += 1; j += 1; }
    else if (table[i + 1][j] >= table[i][j + 1]) { out.push({ op: "-", text: a[i] }); i += 1; }
    else { out.push({ op: "+", text: b[j] }); j += 1; }
  }
  while (i < a.length) out.push({ op: "-", text: a[i++] });
  while (j < b.length) out.push({ op: "+", text: b[j++] });
  return out;
}

// -- Markdown (model cards): headings, lists, code, tables, emphasis, links ------------------

function inline(text) {
  const parts = [];
  const pattern = /(`[^`]+`|\*\*[^*]+\*\*|\[[^\]]+\]\([^)\s]+\))/g;
  let last = 0;
  for (const match of text.matchAll(pattern)) {
    if (match.index > last) parts.push(text.slice(last, match.index));
    const token = match[0];
    if (token.startsWith("`")) parts.push(h("code", {}, token.slice(1, -1)));
    else if (token.startsWith("**")) parts.push(h("strong", {}, token.slice(2, -2)));
    else {
      const [, label, url] = token.match(/^\[([^\]]+)\]\(([^)\s]+)\)$/);
      // Only web links become links; anything else (javascript:, data:) stays text.
      parts.push(/^https?:\/\//.test(url)
        ? h("a", { href: url, rel: "noopener noreferrer", target: "_blank" }, label) : label);
    }
    last = match.index + token.length;
  }
  if (last < text.length) parts.push(text.slice(last));
  return parts;
}

/** A model card (Markdown, optional YAML front matter) as DOM nodes. */
export function markdown(text) {
  const root = h("div", { class: "card" });
  let lines = text.replace(/\r\n/g, "\n").split("\n");
  if (lines[0] === "---") {
    const end = lines.indexOf("---", 1);
    if (end > 0) {
      root.append(h("details", {}, h("summary", {}, "Card metadata"), h("pre", {}, lines.slice(1, end).join("\n"))));
      lines = lines.slice(end + 1);
    }
  }
  let index = 0;
  while (index < lines.length) {
    const line = lines[index];
    if (line.startsWith("```")) {
      const body = [];
      index += 1;
      while (index < lines.length && !lines[index].startsWith("```")) body.push(lines[index++]);
      root.append(h("pre", {}, body.join("\n")));
      index += 1;
    } else if (/^#{1,6} /.test(line)) {
      const level = Math.min(line.indexOf(" "), 4);
      root.append(h(`h${level + 1}`, {}, inline(line.slice(line.indexOf(" ") + 1))));
      index += 1;
    } else if (/^\s*[-*] /.test(line)) {
      const list = h("ul");
      while (index < lines.length && /^\s*[-*] /.test(lines[index])) {
        list.append(h("li", {}, inline(lines[index].replace(/^\s*[-*] /, ""))));
        index += 1;
      }
      root.append(list);
    } else if (line.startsWith("|")) {
      const rows = [];
      while (index < lines.length && lines[index].startsWith("|")) rows.push(lines[index++]);
      const cells = (row) => row.replace(/^\||\|$/g, "").split("|").map((cell) => cell.trim());
      const table = h("table");
      rows.forEach((row, position) => {
        if (/^\|[\s:|-]+\|?$/.test(row)) return;
        table.append(h("tr", {}, cells(row).map((cell) => h(position ? "td" : "th", {}, inline(cell)))));
      });
      root.append(table);
    } else if (line.trim()) {
      const paragraph = [];
      while (index < lines.length && lines[index].trim() && !/^(#|```|\||\s*[-*] )/.test(lines[index])) {
        paragraph.push(lines[index++]);
      }
      root.append(h("p", {}, inline(paragraph.join(" "))));
    } else {
      index += 1;
    }
  }
  return root;
}
