"""Settings read from environment variables and validated once, at start-up.

Every variable is listed in the README's configuration table; a bad value
raises ConfigError with one line that names the variable, so the process can
exit with that line instead of a traceback.
"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

__all__ = ["ConfigError", "Settings", "parse_duration", "parse_size", "format_size"]


class ConfigError(ValueError):
    """A configuration value is missing or malformed."""


_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse '500MB', '1.5GiB' or '1048576' into a byte count.

    KB/MB/GB are decimal (10**6 for MB) as in SI; KiB/MiB/GiB are binary.
    """
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    number, unit = m.groups()
    factor = _SIZE_UNITS.get(unit.upper())
    if factor is None:
        raise ValueError(f"unknown size unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    value = float(number) * factor if "." in number else int(number) * factor
    return int(value)


def format_size(n: int) -> str:
    """Human-readable size with decimal units, as people read download sizes."""
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|sec|s|minute|min|m|hour|h)\s*$")
_PERIOD = {"second": 1, "sec": 1, "s": 1, "minute": 60, "min": 60, "m": 60, "hour": 3600, "h": 3600}


@dataclass(frozen=True)
class Rate:
    """``count`` requests per ``seconds``, as in RATE_LIMIT=100/minute."""

    count: int
    seconds: int


def parse_rate(name: str, text: str | None) -> Rate | None:
    if not text:
        return None
    m = _RATE_RE.match(text)
    if not m or int(m[1]) == 0:
        raise ConfigError(f"{name} must look like 100/minute (per second, minute or hour), got {text!r}")
    return Rate(int(m[1]), _PERIOD[m[2]])


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 8084
    mongodb_url: str | None = None
    mongodb_db: str = "tensorfleet"
    gridfs_bucket: str = "models"
    data_dir: str = "./data"
    max_file_size: int = 500 * 10**6
    log_level: str = "INFO"
    log_format: str = "text"
    enable_auth: bool = False
    api_keys_file: str | None = None
    # Development only: "key:scope:name,..." (keys in clear).
    api_keys: str | None = None
    # Paths that need no key even with auth on.
    auth_open_paths: tuple[str, ...] = ("/health", "/metrics")
    max_page_size: int = 100
    cors_origins: tuple[str, ...] = field(default_factory=tuple)
    # How long start-up waits for MongoDB before giving up, and how long a
    # health check waits before calling the database unreachable.
    mongodb_timeout_ms: int = 5000
    # GridFS's standard 255 KiB unless the bench argues otherwise.
    gridfs_chunk_size: int = 255 * 1024
    # Processes serving one port (SO_REUSEPORT), to use every core.
    workers: int = 1
    # /health/detailed calls the disk unhealthy below this much free space.
    min_free_disk: int = 10**9
    # Limits (issue: security and reliability); every one is in the README.
    rate_limit: Rate | None = None
    download_rate_limit: Rate | None = None
    max_concurrent_downloads: int = 128
    download_queue_seconds: float = 10.0
    download_timeout: float = 600.0
    shutdown_grace_seconds: float = 60.0
    max_header_size: int = 8190
    max_url_length: int = 8190
    max_json_size: int = 2**20
    # Signs the web UI's session cookies (app/ui/session.py). Unset: a random
    # one per start-up, shared by the workers, so sessions end at a restart.
    ui_session_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    # Connection-level limits (slow and stalled clients); every one is in the README.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    max_connections: int = 1000
    max_concurrent_uploads: int = 32
    max_uploads_per_client: int = 16
    upload_queue_seconds: float = 10.0
    # Multi-file versions (snapshots): files per version, and how long a blob
    # stored through the blobs API is kept while no version refers to it.
    max_files_per_version: int = 10_000
    blob_grace: timedelta = timedelta(hours=24)
    # Resumable uploads (POST /api/v1/uploads): open sessions per API key and in
    # all, and how long an idle one lives before it expires (gc removes its bytes).
    max_upload_sessions: int = 16
    max_upload_sessions_total: int = 512
    upload_session_ttl: timedelta = timedelta(hours=24)
    # Seconds a reader's lease on stored content outlives its last renewal
    # (app/leases.py): how long content a crashed process was streaming stays.
    lease_ttl: float = 60.0
    # Seconds between writes of this process's download counts (app/counts.py);
    # 0 writes each count before its download's body, as before batching.
    count_flush_interval: float = 1.0

    @property
    def storage_kind(self) -> str:
        return "mongodb" if self.mongodb_url else "embedded"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        return cls(
            host=_str(env, "HOST", cls.host),
            port=_int(env, "PORT", cls.port, 0, 65535),
            mongodb_url=_mongodb_url(env),
            mongodb_db=_name(env, "MONGODB_DB", cls.mongodb_db),
            gridfs_bucket=_name(env, "GRIDFS_BUCKET", cls.gridfs_bucket),
            data_dir=_str(env, "DATA_DIR", cls.data_dir),
            max_file_size=_size(env, "MAX_FILE_SIZE", cls.max_file_size),
            log_level=_log_level(env),
            log_format=_choice(env, "LOG_FORMAT", cls.log_format, ("text", "json")),
            enable_auth=_bool(env, "ENABLE_AUTH", cls.enable_auth),
            api_keys_file=_raw(env, "API_KEYS_FILE") or None,
            api_keys=_raw(env, "API_KEYS") or None,
            auth_open_paths=_paths(env, "AUTH_OPEN_PATHS", cls.auth_open_paths),
            max_page_size=_int(env, "MAX_PAGE_SIZE", cls.max_page_size, 1, 10_000),
            cors_origins=_origins(env),
            mongodb_timeout_ms=_int(env, "MONGODB_TIMEOUT_MS", cls.mongodb_timeout_ms, 100, 600_000),
            gridfs_chunk_size=_chunk_size(env),
            workers=_int(env, "WORKERS", cls.workers, 1, 64),
            min_free_disk=_size(env, "HEALTH_MIN_FREE_DISK", cls.min_free_disk),
            rate_limit=parse_rate("RATE_LIMIT", _raw(env, "RATE_LIMIT")),
            download_rate_limit=parse_rate("DOWNLOAD_RATE_LIMIT", _raw(env, "DOWNLOAD_RATE_LIMIT")),
            max_concurrent_downloads=_int(env, "MAX_CONCURRENT_DOWNLOADS", cls.max_concurrent_downloads, 0, 100_000),
            download_queue_seconds=_int(env, "DOWNLOAD_QUEUE_SECONDS", int(cls.download_queue_seconds), 0, 3600),
            download_timeout=_int(env, "DOWNLOAD_TIMEOUT", int(cls.download_timeout), 1, 86_400),
            shutdown_grace_seconds=_int(env, "SHUTDOWN_GRACE_SECONDS", int(cls.shutdown_grace_seconds), 0, 86_400),
            max_header_size=_int(env, "MAX_HEADER_SIZE", cls.max_header_size, 1024, 1_048_576),
            max_url_length=_int(env, "MAX_URL_LENGTH", cls.max_url_length, 256, 1_048_576),
            max_json_size=_size(env, "MAX_JSON_SIZE", cls.max_json_size),
            ui_session_secret=_session_secret(env),
            header_timeout=_int(env, "HEADER_TIMEOUT", int(cls.header_timeout), 1, 3600),
            body_timeout=_int(env, "BODY_TIMEOUT", int(cls.body_timeout), 1, 86_400),
            keepalive_timeout=_int(env, "KEEPALIVE_TIMEOUT", int(cls.keepalive_timeout), 1, 86_400),
            max_connections=_int(env, "MAX_CONNECTIONS", cls.max_connections, 1, 1_000_000),
            max_concurrent_uploads=_int(env, "MAX_CONCURRENT_UPLOADS", cls.max_concurrent_uploads, 0, 100_000),
            max_uploads_per_client=_int(env, "MAX_UPLOADS_PER_CLIENT", cls.max_uploads_per_client, 0, 100_000),
            upload_queue_seconds=_int(env, "UPLOAD_QUEUE_SECONDS", int(cls.upload_queue_seconds), 0, 3600),
            max_files_per_version=_int(env, "MAX_FILES_PER_VERSION", cls.max_files_per_version, 1, 1_000_000),
            blob_grace=_duration(env, "BLOB_GRACE", cls.blob_grace, timedelta(0), timedelta(days=365)),
            max_upload_sessions=_int(env, "MAX_UPLOAD_SESSIONS", cls.max_upload_sessions, 1, 1_000_000),
            max_upload_sessions_total=_int(env, "MAX_UPLOAD_SESSIONS_TOTAL", cls.max_upload_sessions_total,
                                           1, 10_000_000),
            upload_session_ttl=_duration(env, "UPLOAD_SESSION_TTL", cls.upload_session_ttl, timedelta(seconds=1),
                                         timedelta(days=365)),
            lease_ttl=_int(env, "LEASE_TTL", int(cls.lease_ttl), 2, 86_400),
            count_flush_interval=_seconds(env, "COUNT_FLUSH_INTERVAL", cls.count_flush_interval, 0, 3600),
        )

    def describe(self) -> str:
        """One line for the start-up log; never includes credentials."""
        where = _redact(self.mongodb_url) if self.mongodb_url else os.path.abspath(self.data_dir)
        return f"storage={self.storage_kind} ({where}) listen={self.host}:{self.port}"


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None else value.strip()


def _str(env, name, default):
    value = _raw(env, name)
    if value is None:
        return default
    if not value:
        raise ConfigError(f"{name} must not be empty")
    return value


def _int(env, name, default, lo, hi):
    n = _parsed(env, name, int, "a whole number")
    if n is None:
        return default
    if not lo <= n <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {n}")
    return n


def _seconds(env, name, default, lo, hi):
    n = _parsed(env, name, float, "a number of seconds")
    if n is None:
        return default
    # NaN and infinity fail the comparison too.
    if not lo <= n <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi} seconds, got {_raw(env, name)!r}")
    return n


def _parsed(env, name, parse, expected):
    """``parse`` of the variable's value, or None when it is unset or empty."""
    value = _raw(env, name)
    if value is None or value == "":
        return None
    try:
        return parse(value)
    except ValueError:
        raise ConfigError(f"{name} must be {expected}, got {value!r}") from None


def _bool(env, name, default):
    value = _raw(env, name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


def _size(env, name, default):
    value = _raw(env, name)
    if value is None or value == "":
        return default
    try:
        n = parse_size(value)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    if n <= 0:
        raise ConfigError(f"{name} must be greater than zero, got {value!r}")
    return n


_DURATION_RE = re.compile(r"^(\d+)([smhdw]?)$")
_DURATION_UNITS = {"": "seconds", "s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_duration(text: str) -> timedelta:
    """'86400' (seconds, as the other timeouts) or '90s', '30m', '24h', '7d', '2w'."""
    m = _DURATION_RE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r} (seconds, or a number with s, m, h, d or w, e.g. 24h)")
    return timedelta(**{_DURATION_UNITS[m[2]]: int(m[1])})


def _duration(env, name, default, lo, hi):
    value = _raw(env, name)
    if value is None or value == "":
        return default
    try:
        d = parse_duration(value)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    if not lo <= d <= hi:
        raise ConfigError(f"{name} must be between {lo} and {hi}, got {value!r}")
    return d


def _chunk_size(env):
    n = _size(env, "GRIDFS_CHUNK_SIZE", Settings.gridfs_chunk_size)
    # A chunk document must stay well inside MongoDB's 16 MiB document limit.
    if not 1024 <= n <= 15 * 2**20:
        raise ConfigError(f"GRIDFS_CHUNK_SIZE must be between 1KiB and 15MiB, got {n} bytes")
    return n


def _name(env, name, default):
    value = _str(env, name, default)
    # MongoDB database and collection names: keep to a portable, safe subset.
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", value):
        raise ConfigError(f"{name} must be 1-63 characters of A-Z, a-z, 0-9, '_' or '-', got {value!r}")
    return value


def _choice(env, name, default, choices):
    value = (_raw(env, name) or default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _log_level(env):
    value = (_raw(env, "LOG_LEVEL") or "INFO").upper()
    if value not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)}, got {value!r}")
    return value


def _mongodb_url(env):
    value = _raw(env, "MONGODB_URL")
    if not value:
        return None
    if not value.startswith(("mongodb://", "mongodb+srv://")):
        raise ConfigError(f"MONGODB_URL must start with mongodb:// or mongodb+srv://, got {_redact(value)!r}")
    return value


def _paths(env, name, default):
    value = _raw(env, name)
    if value is None:
        return default
    paths = tuple(p.strip() for p in value.split(",") if p.strip())
    for p in paths:
        if not p.startswith("/"):
            raise ConfigError(f"{name} entries must be paths starting with '/', got {p!r}")
    return paths


def _origins(env):
    value = _raw(env, "CORS_ORIGINS") or ""
    origins = tuple(o.strip() for o in value.split(",") if o.strip())
    for o in origins:
        if o != "*" and not re.fullmatch(r"https?://[^/\s]+", o):
            raise ConfigError(f"CORS_ORIGINS entries must be '*' or scheme://host[:port], got {o!r}")
    return origins


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _session_secret(env):
    value = _raw(env, "UI_SESSION_SECRET")
    if not value:
        return secrets.token_urlsafe(32)
    # Whoever guesses it can forge a session of any key: as strong as a key.
    if len(value) < 32:
        raise ConfigError(f"UI_SESSION_SECRET must be at least 32 characters, got {len(value)}")
    return value
