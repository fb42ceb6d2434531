// The console's only door to the service: every request goes through here, with the bearer
// token the user typed (kept in this tab's sessionStorage, sent to this origin only).
"use strict";

const TOKEN_KEY = "tureen-token";

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || "http_error";
    this.details = error.details || {};
  }
}

/** Called whenever the service answers 401: the console then asks for a token. */
let onUnauthorized = () => {};
export function whenUnauthorized(callback) { onUnauthorized = callback; }

export function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

function headers(extra) {
  const all = { ...(extra || {}) };
  const given = token();
  if (given) all.Authorization = `Bearer ${given}`;
  return all;
}

/** fetch() with the token; a non-2xx answer throws an ApiError (401 also calls back). */
export async function request(method, path, { body, type, extraHeaders, signal } = {}) {
  const init = { method, headers: headers(extraHeaders), cache: "no-store", signal };
  if (body !== undefined) {
    init.body = typeof body === "string" ? body : JSON.stringify(body);
    init.headers["Content-Type"] = type || "application/json";
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    let parsed = null;
    try { parsed = await response.json(); } catch { parsed = null; }
    const error = new ApiError(response.status, parsed);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return response;
}

export async function getJson(path, options) {
  return (await request("GET", path, options)).json();
}

export async function sendJson(method, path, options) {
  return (await request(method, path, options)).json();
}

export async function getText(path) {
  return (await request("GET", path)).text();
}

/**
 * Follow a job's Server-Sent Events. EventSource cannot send a bearer header, so the stream
 * is read with fetch and parsed here. Returns a function that stops following.
 */
export function follow(path, onEvent, onEnd) {
  const controller = new AbortController();
  (async () => {
    try {
      const response = await request("GET", path, { signal: controller.signal });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const message = buffer.slice(0, end);
          buffer = buffer.slice(end + 2);
          let name = "message";
          const data = [];
          for (const line of message.split("\n")) {
            if (line.startsWith("event: ")) name = line.slice(7);
            else if (line.startsWith("data: ")) data.push(line.slice(6));
          }
          if (data.length) onEvent(name, JSON.parse(data.join("\n")));
        }
      }
      onEnd(null);
    } catch (error) {
      if (!controller.signal.aborted) onEnd(error);
    }
  })();
  return () => controller.abort();
}

/**
 * Download a file the API serves. With a token the browser cannot follow a plain link (it
 * would not send the header), so the file is fetched and handed over as a blob.
 */
export async function download(path, filename) {
  const response = await request("GET", path);
  const url = URL.createObjectURL(await response.blob());
  const link = document.createElement("a");
  link.href = url;
  link.download = filename;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
