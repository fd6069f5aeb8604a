"""HTTP handlers, one module per area; ``setup_routes`` wires them up."""

from aiohttp import web

from . import health, models


def setup_routes(app: web.Application) -> None:
    health.setup(app)
    models.setup(app)
