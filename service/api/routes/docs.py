"""``/openapi.json`` behind the API's token, and an optional self-contained ``/docs`` page.

FastAPI's own Swagger UI and ReDoc pages load their scripts and fonts from public CDNs and
cannot send a bearer token, so the app turns them off. The OpenAPI document is served to
authenticated clients like every other route. With the ``docs`` setting on, ``/docs`` serves a
small page whose script (``/docs/docs.js``, from this module) asks for a token, fetches the
document with it and lists the operations; nothing is loaded from any other host, and the
page itself holds no API data, so serving it without a token reveals nothing.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from service.api.deps import Authenticated

#: Everything the page loads comes from this service; no inline script, no other host.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}

DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tureen API</title>
<link rel="stylesheet" href="/docs/docs.css">
</head>
<body>
<h1>tureen API</h1>
<p>The full document is <code>/openapi.json</code> (and <code>openapi.yaml</code> in the
source). When the service has API tokens, give one to read it; the token stays in this page.</p>
<form id="token-form">
<label>Bearer token <input id="token" type="password" autocomplete="off"></label>
<button type="submit">Load</button>
</form>
<p id="status"></p>
<main id="operations"></main>
<script src="/docs/docs.js"></script>
</body>
</html>
"""

DOCS_CSS = """body { font-family: sans-serif; margin: 2em auto; max-width: 60em; line-height: 1.4; }
section { border-top: 1px solid #ccc; padding: 0.5em 0; }
h2 { font-size: 1.1em; margin: 0.3em 0; }
.method { font-family: monospace; font-weight: bold; margin-right: 0.5em; }
pre { background: #f4f4f4; padding: 0.5em; overflow-x: auto; white-space: pre-wrap; }
"""

# Text only (textContent), never HTML, so nothing in the document can inject markup.
DOCS_JS = """"use strict";
const statusLine = document.getElementById("status");
const operations = document.getElementById("operations");

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function render(spec) {
  operations.replaceChildren();
  operations.appendChild(element("p", (spec.info && spec.info.description) || ""));
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const [method, operation] of Object.entries(item)) {
      const section = element("section");
      const title = element("h2");
      title.appendChild(element("span", method.toUpperCase(), "method"));
      title.appendChild(element("code", path));
      section.appendChild(title);
      if (operation.summary) section.appendChild(element("strong", operation.summary));
      if (operation.description) section.appendChild(element("p", operation.description));
      const parameters = (operation.parameters || []).map(
        (p) => `${p.in} ${p.name}${p.required ? " (required)" : ""}: ${p.description || ""}`
      );
      if (parameters.length) section.appendChild(element("pre", parameters.join("\\n")));
      const statuses = Object.entries(operation.responses || {}).map(
        ([code, response]) => `${code}: ${response.description || ""}`
      );
      section.appendChild(element("pre", statuses.join("\\n")));
      operations.appendChild(section);
    }
  }
}

async function load(token) {
  const headers = token ? { Authorization: `Bearer ${token}` } : {};
  statusLine.textContent = "Loading...";
  const response = await fetch("/openapi.json", { headers, cache: "no-store" });
  if (!response.ok) {
    statusLine.textContent = `The document could not be read (HTTP ${response.status}); ` +
      "give a valid token.";
    return;
  }
  statusLine.textContent = "";
  render(await response.json());
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  load(document.getElementById("token").value.trim());
});
load("");
"""

#: Paths of the page and its assets; empty when the page is off.
DOCS_PATHS = ("/docs", "/docs/docs.js", "/docs/docs.css")

openapi_router = APIRouter(include_in_schema=False, dependencies=[Authenticated])
docs_router = APIRouter(include_in_schema=False)


@openapi_router.get("/openapi.json")
async def openapi_document(request: Request) -> JSONResponse:
    """The OpenAPI document; needs the bearer token when the service has tokens."""
    document: dict[str, Any] = request.app.openapi()
    return JSONResponse(document)


@docs_router.get("/docs")
async def docs_page() -> HTMLResponse:
    """The self-contained documentation page."""
    return HTMLResponse(DOCS_HTML, headers=_PAGE_HEADERS)


@docs_router.get("/docs/docs.js")
async def docs_script() -> Response:
    """The page's script, served from the package."""
    return Response(DOCS_JS, media_type="text/javascript", headers=_PAGE_HEADERS)


@docs_router.get("/docs/docs.css")
async def docs_style() -> Response:
    """The page's style sheet, served from the package."""
    return Response(DOCS_CSS, media_type="text/css", headers=_PAGE_HEADERS)
