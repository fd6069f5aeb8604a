"""Typed keys for what the application object carries."""

from aiohttp import web

from .config import Settings
from .storage.base import Storage

SETTINGS = web.AppKey("settings", Settings)
STORAGE = web.AppKey("storage", Storage)
