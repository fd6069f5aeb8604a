"""The application factory and the function that serves it."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource

import aiohttp_cors
from aiohttp import web

from . import auth, connections, limits, logs, metrics, upload_slots
from .appkeys import COUNTS, DOWNLOAD_SLOTS, DRAIN, LEASES, READ_CACHE, SETTINGS, STORAGE, UPLOAD_SLOTS
from .config import ConfigError, Settings
from .counts import DownloadCounts
from .drain import Drain
from .leases import FileLeases
from .middleware import request_middleware
from .read_cache import ReadCache
from .routes import setup_routes
from .storage import Storage, make_storage

log = logging.getLogger("app")

# Allocations between young-generation collections (Python's default: 700).
GC_GEN0 = 50_000


def create_app(settings: Settings, storage: Storage | None = None) -> web.Application:
    """Build the application; the storage is opened on start-up and closed on cleanup."""
    drain = Drain()
    middlewares = [request_middleware(drain)]
    keys = ()
    if settings.enable_auth:
        keys = auth.load_keys(settings.api_keys_file, settings.api_keys)
        if not keys:
            raise ConfigError("ENABLE_AUTH=true needs keys in API_KEYS_FILE or API_KEYS")
    # Rate limits before authentication, so failed attempts are counted too.
    if settings.rate_limit or settings.download_rate_limit:
        middlewares.append(limits.rate_limit_middleware(settings.rate_limit, settings.download_rate_limit))
    if keys:
        middlewares.append(auth.middleware(settings.auth_open_paths))
    app = web.Application(middlewares=middlewares)
    if keys:
        app[auth.KEYS] = keys
    app[DRAIN] = drain
    app[DOWNLOAD_SLOTS] = limits.DownloadSlots(settings.max_concurrent_downloads, settings.download_queue_seconds)
    app[UPLOAD_SLOTS] = upload_slots.UploadSlots(settings.max_concurrent_uploads, settings.max_uploads_per_client,
                                                   settings.upload_queue_seconds)
    app[SETTINGS] = settings
    app[STORAGE] = storage if storage is not None else make_storage(settings)
    app[LEASES] = FileLeases(app[STORAGE], settings.lease_ttl)
    app[READ_CACHE] = ReadCache(app[STORAGE])
    app[COUNTS] = DownloadCounts(app[STORAGE], settings.count_flush_interval)
    app.cleanup_ctx.append(_storage_lifecycle)
    app.cleanup_ctx.append(_metrics_flushing)
    setup_routes(app)
    _setup_cors(app, settings.cors_origins)
    return app


async def _storage_lifecycle(app: web.Application):
    storage = app[STORAGE]
    await storage.open()
    log.info("storage ready: %s", app[SETTINGS].describe())
    await app[LEASES].start()
    await app[COUNTS].start()
    yield
    # Cleanup runs after the drain: no download counts any more.
    await app[COUNTS].stop()
    await app[LEASES].stop()
    await storage.close()


async def _metrics_flushing(app: web.Application):
    drain = app[DRAIN]

    async def flush_every_interval() -> None:
        while True:
            await asyncio.sleep(metrics.FLUSH_SECONDS)
            metrics.TALLY.flush(drain.in_flight)

    task = asyncio.create_task(flush_every_interval())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    metrics.TALLY.flush(drain.in_flight)


def _setup_cors(app: web.Application, origins: tuple[str, ...]) -> None:
    if not origins:
        return
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        expose_headers="*",
        allow_headers="*",
        allow_methods="*",
        max_age=3600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM; raises StorageUnavailable if the store is unreachable.

    Checks the API keys first (ConfigError), so a bad keys file stops start-up.

    With ``workers > 1`` this process only supervises: it starts that many
    serving processes, which share the port through SO_REUSEPORT so the kernel
    spreads connections over every core.
    """
    if settings.enable_auth:
        auth.load_keys(settings.api_keys_file, settings.api_keys)
    else:
        log.warning("authentication is off (ENABLE_AUTH=false): anyone who can reach this port can "
                    "change and delete models")
    if settings.workers > 1:
        from .workers import supervise

        supervise(settings, serve_one)
    else:
        serve_one(settings)


def serve_one(settings: Settings) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a hard dependency on Linux
        uvloop = None
    runner = asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None)
    with runner:
        runner.run(_serve(settings))


def _settle_garbage_collector() -> None:
    """Keep the cycle collector off the hot path once start-up is done.

    Everything loaded so far (modules, the app, its routes) lives as long as the
    process: frozen, collections stop walking it. And a young-generation pass
    every 700 allocations ran several times per request; every GC_GEN0 keeps
    what cyclic garbage waits for collection bounded, at a small fraction of
    the CPU (README, Performance: 16 KB downloads, service CPU per request).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, *gc.get_threshold()[1:])


async def _serve(settings: Settings) -> None:
    app = create_app(settings)
    handler_args = dict(
        access_log=logging.getLogger(logs.ACCESS_LOGGER),
        access_log_class=logs.AccessLogger,
        max_line_size=settings.max_url_length,
        max_field_size=settings.max_header_size,
        keepalive_timeout=settings.keepalive_timeout,
        # No SO_KEEPALIVE, as nginx by default: an idle connection closes after
        # KEEPALIVE_TIMEOUT and a stalled body after DOWNLOAD_TIMEOUT anyway, and
        # setting it cost a socket object per connection (first byte, README).
        tcp_keepalive=False,
    )
    # The drain below already waited for requests in flight.
    app_runner = web.AppRunner(app, shutdown_timeout=1.0, **handler_args)
    await app_runner.setup()
    try:
        guard = connections.ConnectionGuard(connections.connection_limit(settings.max_connections),
                                            settings.header_timeout, settings.body_timeout)
        site = connections.GuardedSite(app_runner, settings.host, settings.port, reuse_port=settings.workers > 1,
                                       guard=guard, handler_args=handler_args)
        await site.start()
        _settle_garbage_collector()
        if guard.limit < settings.max_connections:
            log.warning("serving at most %d connections, not MAX_CONNECTIONS=%d: the file descriptor limit is %d",
                        guard.limit, settings.max_connections, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        log.info("model-service listening on http://%s:%d", settings.host, settings.port)
        await _wait_for_signal()
        # Turn new requests away (503; /health says draining) and let the ones
        # in flight, downloads above all, finish within the grace period.
        drain = app[DRAIN]
        drain.draining = True
        log.info("draining %d request(s) in flight, for up to %g s", drain.in_flight,
                 settings.shutdown_grace_seconds)
        deadline = asyncio.get_running_loop().time() + settings.shutdown_grace_seconds
        if not await drain.wait_idle(settings.shutdown_grace_seconds):
            log.warning("grace period over; %d request(s) cut short", drain.in_flight)
        else:
            # A finished handler may still have response bytes in its socket's
            # buffer; closing now would cut them off.
            await _flush_connections(app_runner.server, deadline)
    finally:
        await app_runner.cleanup()


async def _flush_connections(server, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        pending = [c for c in server.connections
                   if c.transport is not None and not c.transport.is_closing()
                   and c.transport.get_write_buffer_size()]
        if not pending:
            return
        await asyncio.sleep(0.05)


async def _wait_for_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
