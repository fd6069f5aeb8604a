"""Every API route once: method, path template, handler, API key scope, OpenAPI operation.

The router (``setup_routes``), the scope the auth middleware asks for
(``ROUTE_SCOPES``) and the OpenAPI document's paths (openapi.paths) are all
built from ``API``. The web UI's pages are not API operations: app/ui
registers its own routes under /ui (HTML, sign-in, no OpenAPI entry).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from . import auth, openapi, ui
from .appkeys import ROUTE_SCOPES, SETTINGS
from .handlers import analytics, batch, blobs, docs, files, health, metrics, models, upload_sessions
from .http.expect import defer_expect
from .urls import API as API_PREFIX
from .urls import BLOB, BLOBS, FILE_PATH, MODEL, MODEL_DOWNLOAD, MODEL_FILES, MODELS, OPENAPI_JSON, UPLOAD, UPLOADS

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    scope: str  # the API key scope it needs, one of auth.SCOPES
    operation: str  # its OpenAPI operationId (openapi.operations)
    # A GET also answers HEAD (aiohttp adds it): the operationId documenting that HEAD, if any.
    head: str | None = None
    # Takes a body: Expect: 100-continue is answered only once the handler is ready to read it.
    body: bool = False

    @property
    def template(self) -> str:
        """The path as OpenAPI and aiohttp's canonical form write it: {name}, without a {name:regex}'s regex."""
        return re.sub(r"\{([^}:]+):[^}]*\}", r"{\1}", self.path)

    def methods(self) -> list[tuple[str, str | None]]:
        """(method, operationId) of each method this route answers; HEAD's operation may be None."""
        if self.method == "GET":
            return [("GET", self.operation), ("HEAD", self.head)]
        return [(self.method, self.operation)]


# In the order of the OpenAPI document (and the /docs page). The router's order
# does not decide anything here: aiohttp tries the templates with the longest
# fixed prefix first (.../statistics before .../{id}), and no two templates
# sharing a prefix match the same path.
API: tuple[Route, ...] = (
    Route("GET", "/health", health.health, "read", "health"),
    Route("GET", "/health/detailed", health.detailed, "read", "healthDetailed"),
    Route("GET", "/metrics", metrics.metrics_endpoint, "read", "metrics"),
    Route("GET", OPENAPI_JSON, docs.openapi_json, "read", "openapi"),
    Route("GET", "/docs", docs.docs_page, "read", "docs"),
    Route("GET", MODELS, models.list_models, "read", "listModels"),
    Route("POST", MODELS, models.register, "write", "registerModel", body=True),
    Route("GET", MODELS + "/search", models.list_models, "read", "searchModels"),
    Route("GET", MODELS + "/statistics", analytics.statistics, "read", "registryStatistics"),
    Route("GET", API_PREFIX + "/statistics", analytics.statistics, "read", "registryStatisticsAlias"),
    Route("GET", MODELS + "/popular", analytics.popular, "read", "popularModels"),
    Route("GET", MODELS + "/recent", analytics.recent, "read", "recentModels"),
    Route("POST", MODELS + "/batch", batch.batch, "admin", "batchModels", body=True),
    Route("GET", MODELS + "/by-name/{name}", models.by_name, "read", "getModelByName"),
    Route("GET", MODELS + "/by-name/{name}/download", files.download_by_name, "read", "downloadModelByName",
          head="downloadModelByNameHead"),
    Route("GET", MODELS + "/by-name/{name}/files", files.manifest_by_name, "read", "modelFilesByName",
          head="modelFilesByNameHead"),
    Route("GET", MODELS + "/by-name/{name}/files" + FILE_PATH, files.version_file_by_name, "read", "downloadFileByName",
          head="downloadFileByNameHead"),
    Route("GET", MODEL, models.get_model, "read", "getModel"),
    Route("PUT", MODEL, models.update_model, "write", "updateModel", body=True),
    Route("DELETE", MODEL, models.delete_model, "admin", "deleteModel"),
    Route("GET", MODEL + "/versions", models.list_versions, "read", "listVersions"),
    Route("POST", MODEL + "/versions", models.create_version, "write", "createVersion", body=True),
    Route("POST", MODEL + "/upload", files.upload, "write", "uploadModelFilePost", body=True),
    Route("PUT", MODEL + "/upload", files.upload, "write", "uploadModelFile", body=True),
    Route("GET", MODEL_DOWNLOAD, files.download, "read", "downloadModel", head="downloadModelHead"),
    Route("GET", MODEL + "/info", files.info, "read", "modelFileInfo"),
    Route("GET", MODEL_FILES, files.manifest, "read", "modelFiles", head="modelFilesHead"),
    Route("GET", MODEL_FILES + FILE_PATH, files.version_file, "read", "downloadFile", head="downloadFileHead"),
    Route("POST", BLOBS + "/missing", blobs.missing, "write", "blobsMissing", body=True),
    Route("PUT", BLOB, blobs.put_blob, "write", "putBlob", body=True),
    Route("HEAD", BLOB, blobs.head_blob, "read", "headBlob"),
    # A session is its writer's own: even reading its offset takes the write scope.
    Route("POST", UPLOADS, upload_sessions.open_session, "write", "openUploadSession", body=True),
    Route("GET", UPLOAD, upload_sessions.status, "write", "getUploadSession", head="headUploadSession"),
    Route("PATCH", UPLOAD, upload_sessions.append, "write", "appendUploadChunk", body=True),
    Route("PUT", UPLOAD, upload_sessions.complete, "write", "completeUploadSession", body=True),
    Route("DELETE", UPLOAD, upload_sessions.cancel, "write", "cancelUploadSession"),
)


def scopes() -> dict[tuple[str, str], str]:
    """(method, path template) to the scope it needs, HEADs included."""
    return {(method, route.template): route.scope for route in API for method, _ in route.methods()}


# aiohttp tries the templates that share a fixed prefix (/api/v1/models/{id}/...) one after another, in
# the order they were added, each a coroutine and a regex: the ones most requests take are added first
# (a 16 KB download spent an eighth of its time in routing behind five others).
_RESOLVED_FIRST = (MODEL_DOWNLOAD, MODEL_FILES + FILE_PATH, MODEL)


def _router_order(route: Route) -> int:
    return _RESOLVED_FIRST.index(route.path) if route.path in _RESOLVED_FIRST else len(_RESOLVED_FIRST)


def setup_routes(app: web.Application) -> None:
    """The API's routes from ``API``, then the web UI's own."""
    unknown = {route.scope for route in API} - set(auth.SCOPES)
    if unknown:
        raise ValueError(f"routes.API names scopes auth does not know: {sorted(unknown)}")
    docs.setup(app, openapi.build(app[SETTINGS]))
    app[ROUTE_SCOPES] = scopes()
    # Stable: the methods of one path stay together, so they share one resource.
    for route in sorted(API, key=_router_order):
        extra = {"expect_handler": defer_expect} if route.body else {}
        if route.method == "GET":
            app.router.add_get(route.path, route.handler, **extra)
        else:
            app.router.add_route(route.method, route.path, route.handler, **extra)
    ui.setup(app)
