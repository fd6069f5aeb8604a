"""The pages: models, a model version, statistics, sign-in; and the forms that change a model.

Every query goes through the same functions the JSON API calls (validation,
registry, storage); this module only turns their results into HTML.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import orjson
from aiohttp import web
from multidict import MultiDict

from .. import auth, clock, errors, registry, snapshots, validation
from ..appkeys import COUNTS, LEASES, SETTINGS, STORAGE
from ..config import format_size
from ..errors import ApiError
from ..handlers import files
from ..handlers.common import model_or_404
from ..storage.base import ModelQuery
from . import charts
from .session import PREFIX, SESSIONS, Session, current

KEYS = web.AppKey("ui_keys", tuple)  # the API keys, for sign-in
PAGE_SIZE = 25
SORTS = (
    ("-created_at", "Newest first"),
    ("created_at", "Oldest first"),
    ("name", "Name A-Z"),
    ("-name", "Name Z-A"),
    ("-download_count", "Most downloaded"),
    ("-metrics.accuracy", "Highest accuracy"),
)
# Pages may run only our own script and style, and no one may frame them.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


class Visit:
    """Who is asking and what they may do, for a handler and its template."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.auth = request.app[SETTINGS].enable_auth
        self.identity = auth.identity(request)
        loaded = current(request)
        self.session = loaded or Session.new()
        self.fresh = loaded is None

    def may(self, scope: str) -> bool:
        return not self.auth or (self.identity is not None and auth.allows(self.identity, scope))

    def render(self, template: str, context: dict, status: int = 200) -> web.Response:
        context = {"visit": self, "csrf": self.session.csrf, "can_write": self.may("write"),
                   "can_admin": self.may("admin"), **context}
        response = aiohttp_jinja2.render_template(template, self.request, context, status=status)
        response.headers.update(_HEADERS)
        return response

    def error(self, status: int, title: str, message: str) -> web.Response:
        return self.render("error.html", {"title": title, "message": message}, status=status)

    def finish(self, response: web.StreamResponse) -> web.StreamResponse:
        if self.fresh:
            self.request.app[SESSIONS].save(self.request, response, self.session)
        return response


def page(scope: str = "read"):
    """A UI handler: sign-in first when auth is on, then the scope, then (POST) the CSRF token."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handler(request: web.Request) -> web.StreamResponse:
            visit = Visit(request)
            if visit.auth and visit.identity is None:
                if request.method == "GET":
                    target = f"{PREFIX}/sign-in?" + urlencode({"next": request.path_qs})
                else:
                    target = f"{PREFIX}/sign-in"
                return visit.finish(see_other(target))
            if not visit.may(scope):
                return visit.finish(visit.error(
                    403, "Not allowed", f"Your key's scope is {visit.identity.scope}; this action needs {scope}."))
            if request.method == "POST":
                form = await request.post()
                if visit.fresh or not visit.session.csrf_ok(form.get("csrf")):
                    return visit.finish(visit.error(
                        403, "Form expired", "This form's security token is missing or out of date. "
                                             "Go back, reload the page and try again."))
            try:
                response = await fn(request, visit)
            except ApiError as e:
                response = visit.error(e.status, "Cannot do that" if e.status < 500 else "Error", e.message)
            return visit.finish(response)

        return handler

    return wrap


# -- formatting --------------------------------------------------------------------

def when(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else ""


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def show(value) -> str:
    """A metadata value as text: numbers short, lists joined, objects as JSON."""
    if isinstance(value, bool) or value is None:
        return orjson.dumps(value).decode()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(show(v) for v in value)
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    return str(value)


def size(n: int | None) -> str:
    return "" if n is None else format_size(n)


def key_metric(metrics: dict) -> str:
    if "accuracy" in metrics:
        return f"accuracy {number(metrics['accuracy'])}"
    first = min(metrics.items(), default=None)
    return f"{first[0]} {number(first[1])}" if first else ""


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the models table, formatted here: attribute lookups on a dict cost
    Jinja an exception each, and this table is the page that has to stay fast."""

    url: str
    name: str
    version: str
    algorithm: str
    status: str
    tags: list
    metric: str
    size: str
    downloads: int
    created_iso: str
    created: str

    @classmethod
    def of(cls, doc: dict) -> "Row":
        total = snapshots.total_size(doc)
        iso = doc["created_at"].isoformat()  # UTC, as storage hands every timestamp over
        return cls(f"{PREFIX}/models/{doc['id']}", doc["name"], doc["version"], doc["algorithm"], doc["status"],
                   doc.get("tags", []),
                   key_metric(doc.get("metrics", {})), size(total) if total is not None else "",
                   doc.get("download_count", 0), iso, f"{iso[:10]} {iso[11:16]} UTC")


FILTERS = {"when": when, "number": number, "size": size, "show": show}


# -- pages -------------------------------------------------------------------------

async def root(request: web.Request) -> web.StreamResponse:
    return web.Response(status=302, headers={"Location": PREFIX})


def _page_url(params: MultiDict, **changes) -> str:
    merged = {k: v for k, v in params.items() if v != ""}
    merged.update({k: str(v) for k, v in changes.items()})
    return f"{PREFIX}?{urlencode(merged)}" if merged else PREFIX


@page()
async def models(request: web.Request, visit: Visit) -> web.Response:
    params = MultiDict(request.query)
    if "limit" not in params:
        params["limit"] = str(min(PAGE_SIZE, request.app[SETTINGS].max_page_size))
    # One row per name (its latest version) unless every version is asked for.
    every_version = request.query.get("versions") == "all"
    params["latest"] = "false" if every_version else "true"
    query, page_no, limit = validation.listing(params, request.app[SETTINGS].max_page_size)
    await request.app[COUNTS].settle()
    docs, total = await request.app[STORAGE].find_models(query)
    pages = max(1, math.ceil(total / limit))
    shown = {k: request.query.get(k, "") for k in ("q", "algorithm", "status", "tags", "min_accuracy", "sort")}
    keep = MultiDict((k, v) for k, v in request.query.items() if k != "page")
    return visit.render("models.html", {
        "models": [Row.of(d) for d in docs],
        "total": total, "page": page_no, "pages": pages, "limit": limit,
        "shown": shown, "statuses": validation.STATUSES, "sorts": SORTS, "every_version": every_version,
        "prev_url": _page_url(keep, page=page_no - 1) if page_no > 1 else None,
        "next_url": _page_url(keep, page=page_no + 1) if page_no < pages else None,
        "first": query.skip + 1 if docs else 0, "last": query.skip + len(docs),
    })


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


@page()
async def model(request: web.Request, visit: Visit) -> web.Response:
    await request.app[COUNTS].settle()
    doc = await model_or_404(request)
    history = await registry.versions_of(request.app[STORAGE], doc["name"])
    labels = {d["id"]: d["version"] for d in history}
    api = f"{_base_url(request)}/api/v1/models/{doc['id']}/download"
    auth_header = ' -H "X-API-Key: $MODEL_SERVICE_API_KEY"' if visit.auth else ""
    # A single file is its version's download; a snapshot's files are each read
    # under /files/ (its download is the tar of all of them).
    tar = snapshots.is_snapshot(doc)
    files_ = [{"path": e["path"], "size": e["size_bytes"], "sha256": e["checksum"].removeprefix("sha256:"),
               "url": f"{PREFIX}/models/{doc['id']}/" + (f"files/{quote(e['path'])}" if tar else "download")}
              for e in snapshots.entries(doc)]
    pull_output = f" -o {doc['name']}-{doc['version']}" if tar else ""
    return visit.render("model.html", {
        "m": doc, "history": history, "labels": labels, "files": files_,
        "statuses": validation.STATUSES,
        "curl": f"curl -fOJ{auth_header} {api}",
        "pull": f"model-service pull {doc['id']}{pull_output} --url {_base_url(request)}",
        "tar": tar,
    })


@page()
async def download(request: web.Request, visit: Visit) -> web.StreamResponse:
    # The API's own download: ranges, checksums, counting, limits, all alike.
    return await files.download(request)


@page()
async def version_file(request: web.Request, visit: Visit) -> web.StreamResponse:
    return await files.version_file(request)


@page("write")
async def set_status(request: web.Request, visit: Visit) -> web.StreamResponse:
    form = await request.post()
    return await _update(request, validation.update({"status": form.get("status", "")}))


@page("write")
async def set_tags(request: web.Request, visit: Visit) -> web.StreamResponse:
    form = await request.post()
    tags = [t.strip() for t in str(form.get("tags", "")).split(",") if t.strip()]
    return await _update(request, validation.update({"tags": tags}))


async def _update(request: web.Request, fields: dict) -> web.StreamResponse:
    model_id = validation.model_id(request.match_info["id"])
    if await registry.update(request.app[STORAGE], model_id, fields) is None:
        raise ApiError(errors.NOT_FOUND, f"no model with id {model_id}")
    return see_other(f"{PREFIX}/models/{model_id}")


@page("admin")
async def confirm_delete(request: web.Request, visit: Visit) -> web.Response:
    return visit.render("delete.html", {"m": await model_or_404(request)})


@page("admin")
async def delete(request: web.Request, visit: Visit) -> web.StreamResponse:
    model_id = validation.model_id(request.match_info["id"])
    doc = await registry.delete(request.app[STORAGE], model_id, request.app[LEASES])
    if doc is None:
        raise ApiError(errors.NOT_FOUND, f"no model with id {model_id}")
    return see_other(PREFIX + "?" + urlencode({"deleted": f"{doc['name']} {doc['version']}"}))


@page()
async def statistics(request: web.Request, visit: Visit) -> web.Response:
    storage = request.app[STORAGE]
    await request.app[COUNTS].settle()
    stats = await registry.statistics(storage)
    popular, _ = await storage.find_models(ModelQuery(sort_field="download_count", sort_desc=True, limit=10))
    this_hour = clock.now().replace(minute=0, second=0, microsecond=0)
    hours = [this_hour - timedelta(hours=23 - i) for i in range(24)]
    per_hour = [(h.strftime("%H:00"), stats.downloads_by_hour.get(h, 0)) for h in hours]
    algorithms = sorted(stats.by_algorithm.items(), key=lambda kv: (-kv[1], kv[0]))
    statuses = [(s, stats.by_status.get(s, 0)) for s in validation.STATUSES]
    return visit.render("statistics.html", {
        "stats": stats, "total": sum(stats.by_status.values()),
        "algorithms": charts.horizontal(algorithms[:15]), "more_algorithms": max(0, len(algorithms) - 15),
        "statuses": charts.horizontal(statuses),
        "hours": charts.columns(per_hour), "popular": [d for d in popular if d.get("download_count")],
    })


@page()
async def not_found(request: web.Request, visit: Visit) -> web.Response:
    own = request.match_info.route.resource
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource is not own:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        # A form's POST-only path asked with GET: 405, as anywhere else.
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise ApiError(errors.NOT_FOUND, f"There is no page at {request.path}.")


async def sign_in_form(request: web.Request) -> web.StreamResponse:
    visit = Visit(request)
    if not visit.auth:
        return see_other(PREFIX)
    return visit.finish(visit.render("sign_in.html", {"next": _safe_next(request.query.get("next"))}))


async def sign_in(request: web.Request) -> web.StreamResponse:
    visit = Visit(request)
    if not visit.auth:
        return see_other(PREFIX)
    form = await request.post()
    target = _safe_next(form.get("next"))
    if visit.fresh or not visit.session.csrf_ok(form.get("csrf")):
        return visit.finish(visit.render("sign_in.html", {
            "next": target, "problem": "The sign-in form expired. Please try again."}, status=403))
    key = str(form.get("api_key", "")).strip()
    identity = auth.identify(request.app[KEYS], key) if key else None
    if identity is None:
        return visit.finish(visit.render("sign_in.html", {
            "next": target, "problem": "That API key is not valid."}, status=401))
    # A new session id and CSRF token at sign-in, so nothing from before carries over.
    sessions = request.app[SESSIONS]
    response = see_other(target)
    sessions.save(request, response, Session.new(sessions.key_id(identity)))
    return response


@page()
async def sign_out(request: web.Request, visit: Visit) -> web.StreamResponse:
    response = see_other(f"{PREFIX}/sign-in" if visit.auth else PREFIX)
    request.app[SESSIONS].end(response, visit.session)
    visit.fresh = False
    return response


def _safe_next(value) -> str:
    """Only a path of this UI: never another site (//host, /\\host) after sign-in."""
    value = str(value or "")
    if (value == PREFIX or value.startswith(PREFIX + "/") or value.startswith(PREFIX + "?")) \
            and "\\" not in value and "//" not in value:
        return value
    return PREFIX

