"""HTTP handlers, one module per area; ``setup_routes`` wires them up."""

from aiohttp import web

from . import analytics, batch, docs, files, health, metrics, models
from .. import ui


def setup_routes(app: web.Application) -> None:
    health.setup(app)
    docs.setup(app)
    metrics.setup(app)
    # Fixed paths (statistics, popular, ...) before models' /{id}, which would match them.
    analytics.setup(app)
    batch.setup(app)
    files.setup(app)
    models.setup(app)
    ui.setup(app)
