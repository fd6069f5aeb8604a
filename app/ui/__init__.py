"""The registry's web UI under /ui: server-rendered pages, no build step, nothing from elsewhere."""

from __future__ import annotations

import functools
from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web

from .. import auth
from ..appkeys import SETTINGS
from ..urls import FILE_PATH
from . import pages
from .session import PREFIX, SESSIONS, Sessions

HERE = Path(__file__).parent


def setup(app: web.Application) -> None:
    settings = app[SETTINGS]
    keys = auth.load_keys(settings.api_keys_file, settings.api_keys) if settings.enable_auth else ()
    app[pages.KEYS] = keys
    app[SESSIONS] = Sessions(settings.ui_session_secret, keys)
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                               auto_reload=False,
                               filters=pages.FILTERS)
    env.globals["PREFIX"] = PREFIX
    r = app.router
    r.add_get("/", pages.root)
    r.add_get(PREFIX, pages.models)
    r.add_get(PREFIX + "/statistics", pages.statistics)
    r.add_get(PREFIX + "/sign-in", pages.sign_in_form)
    r.add_post(PREFIX + "/sign-in", pages.sign_in)
    r.add_post(PREFIX + "/sign-out", pages.sign_out)
    r.add_get(PREFIX + "/models/{id}", pages.model)
    r.add_get(PREFIX + "/models/{id}/download", pages.download)
    r.add_get(PREFIX + "/models/{id}/files" + FILE_PATH, pages.version_file)
    r.add_post(PREFIX + "/models/{id}/status", pages.set_status)
    r.add_post(PREFIX + "/models/{id}/tags", pages.set_tags)
    r.add_get(PREFIX + "/models/{id}/delete", pages.confirm_delete)
    r.add_post(PREFIX + "/models/{id}/delete", pages.delete)
    r.add_static(PREFIX + "/static", HERE / "static", name="ui-static", append_version=True)
    # Last: any other /ui path is a page of its own (HTML, behind sign-in), not the API's JSON 404.
    r.add_get(PREFIX + "/{tail:.*}", pages.not_found)
    # ?v=<hash of the file>: a changed stylesheet is a new URL, never a stale cache.
    env.globals["asset"] = functools.cache(lambda name: str(app.router["ui-static"].url_for(filename=name)))
