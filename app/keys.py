"""Typed keys for what the application object carries."""

from aiohttp import web

from .config import Settings
from .leases import FileLeases
from .storage.base import Storage

SETTINGS = web.AppKey("settings", Settings)
STORAGE = web.AppKey("storage", Storage)
LEASES = web.AppKey("leases", FileLeases)
DRAIN = web.AppKey("drain", object)  # limits.Drain
DOWNLOAD_SLOTS = web.AppKey("download_slots", object)  # limits.DownloadSlots
UPLOAD_SLOTS = web.AppKey("upload_slots", object)  # upload_slots.UploadSlots
