"""GET /api/v1/openapi.json (the OpenAPI 3.1 document) and GET /docs (it, as a static HTML page).

The page is generated here from the document, with inline CSS and nothing
else: no scripts, no fonts, no CDN, so it renders on a machine without
network access (and its Content-Security-Policy says so).
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from aiohttp import web

from ..http.json import json_response
from ..urls import OPENAPI_JSON

DOCUMENT = web.AppKey("openapi_document", dict)
PAGE = web.AppKey("openapi_page", str)

METHODS = ("get", "head", "post", "put", "patch", "delete")


async def openapi_json(request: web.Request) -> web.Response:
    return json_response(request.app[DOCUMENT])


async def docs_page(request: web.Request) -> web.Response:
    response = web.Response(text=request.app[PAGE], content_type="text/html", charset="utf-8")
    response.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'unsafe-inline'"
    return response


def setup(app: web.Application, document: dict) -> None:
    """Serve ``document`` (openapi.build's, for this application's settings) and its page, made once."""
    app[DOCUMENT] = document
    app[PAGE] = render(document)


# --------------------------------------------------------------------------- rendering

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 75em; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0; } h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
h3 { margin: 1.6em 0 .3em; font-family: ui-monospace, monospace; }
table { border-collapse: collapse; width: 100%; margin: .4em 0 1em; }
th, td { border: 1px solid #ddd; padding: .3em .5em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
code, pre { font-family: ui-monospace, monospace; font-size: 12.5px; }
pre { background: #f7f7f7; padding: .6em; overflow-x: auto; }
.m { display: inline-block; min-width: 4.5em; font-weight: bold; text-transform: uppercase; }
.get { color: #0a6; } .head { color: #688; } .post { color: #a60; } .put { color: #06a; } .delete { color: #c22; }
.op { border-left: 4px solid #ddd; padding-left: 1em; }
.muted { color: #777; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _markdown(text: str) -> str:
    """The little markdown the document uses: paragraphs, `code` and pipe tables."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = block.splitlines()
        if all(line.startswith("|") for line in lines):
            rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
                    if not re.fullmatch(r"[|\s:-]+", line)]
            head, body = rows[0], rows[1:]
            out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
                       + "</table>")
        else:
            out.append(f"<p>{_inline(block)}</p>")
    return "\n".join(out)


def _anchor(method: str, path: str) -> str:
    return f"op-{method}-" + re.sub(r"[^A-Za-z0-9]+", "-", path).strip("-")


def _ref_name(ref: str) -> tuple[str, str]:
    _, _, kind, name = ref.split("/")
    return kind, name


def _resolve(doc: dict, obj: dict) -> dict:
    while "$ref" in obj:
        kind, name = _ref_name(obj["$ref"])
        obj = doc["components"][kind][name]
    return obj


def _schema(s: dict | None) -> str:
    """A short HTML description of a schema: linked component names, element types, JSON otherwise."""
    if not s:
        return '<span class="muted">any</span>'
    if "$ref" in s:
        _, name = _ref_name(s["$ref"])
        return f'<a href="#schema-{_e(name)}">{_e(name)}</a>'
    if s.get("format") == "binary":
        return "binary"
    if s.get("type") == "array" and set(s) <= {"type", "items", "description"}:
        return "array of " + _schema(s.get("items"))
    if set(s) <= {"anyOf", "description"}:
        return " or ".join(_schema(x) for x in s["anyOf"])
    if set(s) <= {"type", "description"} and isinstance(s.get("type"), str):
        return _e(s["type"])
    return _json(s, indent=None)


def _json(value: Any, indent: int | None = 2) -> str:
    """JSON in <code>/<pre>, with component references turned into links."""
    text = _e(json.dumps(value, indent=indent, ensure_ascii=False))
    text = re.sub(r"&quot;#/components/schemas/([A-Za-z0-9_]+)&quot;",
                  r'<a href="#schema-\1">\1</a>', text)
    return f"<pre>{text}</pre>" if indent else f"<code>{text}</code>"


def _parameters(doc: dict, params: list[dict]) -> str:
    rows = []
    for raw in params:
        prm = _resolve(doc, raw)
        rows.append(f"<tr><td><code>{_e(prm['name'])}</code></td><td>{_e(prm['in'])}</td>"
                    f"<td>{'yes' if prm.get('required') else 'no'}</td><td>{_schema(prm.get('schema'))}</td>"
                    f"<td>{_inline(prm.get('description', ''))}</td></tr>")
    return ("<table><tr><th>parameter</th><th>in</th><th>required</th><th>schema</th><th>description</th></tr>"
            + "".join(rows) + "</table>")


def _content(content: dict | None) -> str:
    if not content:
        return '<span class="muted">no body</span>'
    return "<br>".join(f"<code>{_e(media)}</code>: {_schema(body.get('schema'))}" for media, body in content.items())


def _response_content(resp: dict) -> str:
    codes = resp.get("x-error-codes")
    if codes and resp.get("content"):
        return ('<code>application/json</code>: <a href="#schema-Error">Error</a>, code '
                + ", ".join(f"<code>{_e(c)}</code>" for c in codes))
    return _content(resp.get("content"))


def _responses(doc: dict, responses: dict) -> str:
    rows = []
    for status, raw in responses.items():
        resp = _resolve(doc, raw)
        hdrs = ", ".join(f"<code>{_e(h)}</code>" for h in resp.get("headers", {}))
        rows.append(f"<tr><td><b>{_e(status)}</b></td><td>{_inline(resp.get('description', ''))}</td>"
                    f"<td>{hdrs}</td><td>{_response_content(resp)}</td></tr>")
    return ("<table><tr><th>status</th><th>description</th><th>headers</th><th>body</th></tr>"
            + "".join(rows) + "</table>")


def _operations(doc: dict):
    for path, item in doc["paths"].items():
        for method in METHODS:
            if method in item:
                yield method, path, item[method]


def _operation(doc: dict, method: str, path: str, o: dict) -> str:
    parts = [f'<section class="op" id="{_anchor(method, path)}">',
             f'<h3><span class="m {method}">{method}</span> {_e(path)}</h3>',
             f"<p><b>{_e(o.get('summary', ''))}</b> <span class=\"muted\">{_e(o.get('operationId', ''))}</span></p>"]
    if o.get("description"):
        parts.append(_markdown(o["description"]))
    if "x-required-scope" in o:
        parts.append(f"<p>API key scope: <b>{_e(o['x-required-scope'])}</b></p>")
    elif o.get("security") == [] and doc.get("security"):
        parts.append("<p>No API key needed.</p>")
    if o.get("parameters"):
        parts.append(_parameters(doc, o["parameters"]))
    body = o.get("requestBody")
    if body:
        required = "required" if body.get("required") else "optional"
        parts.append(f"<p>Request body ({required}): {_inline(body.get('description', ''))}</p>"
                     f"<p>{_content(body.get('content'))}</p>")
    parts.append(_responses(doc, o["responses"]))
    parts.append("</section>")
    return "\n".join(parts)


def render(doc: dict) -> str:
    info = doc["info"]
    index = "".join(
        f'<tr><td><span class="m {m}">{m}</span></td><td><a href="#{_anchor(m, path)}"><code>{_e(path)}</code></a>'
        f"</td><td>{_e(o.get('summary', ''))}</td></tr>"
        for m, path, o in _operations(doc))
    operations = "\n".join(_operation(doc, m, path, o) for m, path, o in _operations(doc))
    schemas = "\n".join(f'<h3 id="schema-{_e(name)}">{_e(name)}</h3>{_json(s)}'
                        for name, s in doc["components"]["schemas"].items())
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(info['title'])} API</title>
<style>{_CSS}</style>
</head>
<body>
<h1>{_e(info['title'])} API</h1>
<p class="muted">version {_e(info['version'])} · OpenAPI {_e(doc['openapi'])} ·
machine-readable: <a href="{OPENAPI_JSON}">{OPENAPI_JSON}</a></p>
{_markdown(info.get('description', ''))}
<h2>Routes</h2>
<table><tr><th>method</th><th>path</th><th>summary</th></tr>{index}</table>
<h2>Operations</h2>
{operations}
<h2>Schemas</h2>
{schemas}
</body>
</html>
"""
