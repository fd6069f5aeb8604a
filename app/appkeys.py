"""Typed aiohttp application keys: what the application object carries (not API keys, see auth)."""

from aiohttp import web

from .config import Settings
from .counts import DownloadCounts
from .leases import FileLeases
from .read_cache import ReadCache
from .storage.base import Storage

SETTINGS = web.AppKey("settings", Settings)
STORAGE = web.AppKey("storage", Storage)
LEASES = web.AppKey("leases", FileLeases)
READ_CACHE = web.AppKey("read_cache", ReadCache)
COUNTS = web.AppKey("counts", DownloadCounts)
DRAIN = web.AppKey("drain", object)  # drain.Drain
DOWNLOAD_SLOTS = web.AppKey("download_slots", object)  # limits.DownloadSlots
UPLOAD_SLOTS = web.AppKey("upload_slots", object)  # upload_slots.UploadSlots
# (method, path template) to the API key scope the route needs, from routes.API.
ROUTE_SCOPES = web.AppKey("route_scopes", dict)
