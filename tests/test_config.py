"""Configuration: defaults, parsing, and one clear line for a bad value."""

import os
import subprocess
import sys

import pytest

from app.config import ConfigError, Settings, format_size, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("500MB", 500_000_000),
        ("1GB", 1_000_000_000),
        ("750MB", 750_000_000),
        ("1.5GiB", 1_610_612_736),
        ("1048576", 1_048_576),
        ("64 KiB", 65_536),
        ("2tb", 2_000_000_000_000),
        ("10B", 10),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "12XB", "-5MB", "1.2.3GB", "ten"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(45_700_000) == "45.7 MB"
    assert format_size(999) == "999 B"
    assert format_size(1_500_000_000) == "1.5 GB"


def test_defaults():
    s = Settings.from_env({})
    assert (s.host, s.port, s.mongodb_url, s.mongodb_db, s.gridfs_bucket) == (
        "0.0.0.0", 8084, None, "tensorfleet", "models")
    assert (s.data_dir, s.max_file_size, s.log_level) == ("./data", 500_000_000, "INFO")
    assert (s.enable_auth, s.max_page_size, s.cors_origins) == (False, 100, ())
    assert s.storage_kind == "embedded"


def test_values_from_env():
    s = Settings.from_env({
        "PORT": "9000", "MONGODB_URL": "mongodb://db:27017", "MAX_FILE_SIZE": "1.5GiB",
        "LOG_LEVEL": "debug", "ENABLE_AUTH": "true", "MAX_PAGE_SIZE": "50",
        "CORS_ORIGINS": "https://a.example, http://localhost:3000",
    })
    assert s.port == 9000 and s.storage_kind == "mongodb"
    assert s.max_file_size == 1_610_612_736 and s.log_level == "DEBUG" and s.enable_auth
    assert s.max_page_size == 50
    assert s.cors_origins == ("https://a.example", "http://localhost:3000")


@pytest.mark.parametrize(
    "name, value",
    [
        ("PORT", "eighty"),
        ("PORT", "70000"),
        ("MAX_FILE_SIZE", "lots"),
        ("MAX_FILE_SIZE", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("ENABLE_AUTH", "maybe"),
        ("MAX_PAGE_SIZE", "0"),
        ("MONGODB_URL", "http://db"),
        ("MONGODB_DB", "bad name"),
        ("GRIDFS_BUCKET", "a/b"),
        ("CORS_ORIGINS", "not a url"),
        ("DATA_DIR", "  "),
    ],
)
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError) as e:
        Settings.from_env({name: value})
    assert name in str(e.value)


def test_mongodb_url_credentials_never_echoed():
    with pytest.raises(ConfigError) as e:
        Settings.from_env({"MONGODB_URL": "http://user:secret@db"})
    assert "secret" not in str(e.value)
    s = Settings.from_env({"MONGODB_URL": "mongodb://user:secret@db:27017"})
    assert "secret" not in s.describe()


def test_serve_exits_with_one_line_naming_the_variable(tmp_path):
    env = {**os.environ, "PORT": "not-a-port", "DATA_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "app", "serve"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "PORT" in lines[0] and "not-a-port" in lines[0]


def test_gridfs_chunk_size_and_workers():
    s = Settings.from_env({"GRIDFS_CHUNK_SIZE": "1MiB", "WORKERS": "2"})
    assert s.gridfs_chunk_size == 1_048_576 and s.workers == 2
    assert Settings.from_env({}).gridfs_chunk_size == 255 * 1024
    for bad in ("100", "16MiB"):
        with pytest.raises(ConfigError, match="GRIDFS_CHUNK_SIZE"):
            Settings.from_env({"GRIDFS_CHUNK_SIZE": bad})
    with pytest.raises(ConfigError, match="WORKERS"):
        Settings.from_env({"WORKERS": "0"})


def test_ui_session_secret():
    # Unset: a fresh random secret each start-up (sessions end at a restart).
    assert len(Settings.from_env({}).ui_session_secret) >= 32
    assert Settings.from_env({}).ui_session_secret != Settings.from_env({}).ui_session_secret
    secret = "s" * 40
    assert Settings.from_env({"UI_SESSION_SECRET": secret}).ui_session_secret == secret
    assert secret not in repr(Settings.from_env({"UI_SESSION_SECRET": secret}))
    with pytest.raises(ConfigError, match="^UI_SESSION_SECRET must be at least 32 characters, got 5$"):
        Settings.from_env({"UI_SESSION_SECRET": "short"})


_CONNECTION_LIMITS = {
    # variable: (attribute, default, a valid value, values refused)
    "HEADER_TIMEOUT": ("header_timeout", 10, 3, ("0", "soon", "3601")),
    "BODY_TIMEOUT": ("body_timeout", 60, 5, ("0", "-1", "1.5")),
    "KEEPALIVE_TIMEOUT": ("keepalive_timeout", 75, 30, ("0", "forever")),
    "MAX_CONNECTIONS": ("max_connections", 1000, 50, ("0", "many", "1000001")),
    "MAX_CONCURRENT_UPLOADS": ("max_concurrent_uploads", 32, 0, ("-1", "lots")),
    "MAX_UPLOADS_PER_CLIENT": ("max_uploads_per_client", 16, 2, ("-3", "two")),
    "UPLOAD_QUEUE_SECONDS": ("upload_queue_seconds", 10, 0, ("-1", "3601", "soon")),
}


@pytest.mark.parametrize("name", sorted(_CONNECTION_LIMITS))
def test_connection_limits_defaults_values_and_refusals(name):
    attr, default, valid, refused = _CONNECTION_LIMITS[name]
    assert getattr(Settings.from_env({}), attr) == default
    assert getattr(Settings.from_env({name: str(valid)}), attr) == valid
    for bad in refused:
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: bad})


def test_snapshot_settings():
    """MAX_FILES_PER_VERSION (files per committed version) and BLOB_GRACE (how long an unreferenced blob is kept)."""
    from datetime import timedelta

    defaults = Settings.from_env({})
    assert defaults.max_files_per_version == 10_000 and defaults.blob_grace == timedelta(hours=24)
    assert Settings.from_env({"MAX_FILES_PER_VERSION": "50"}).max_files_per_version == 50
    for text, expected in (("3600", timedelta(hours=1)), ("90s", timedelta(seconds=90)), ("30m", timedelta(minutes=30)),
                           ("48h", timedelta(hours=48)), ("7d", timedelta(days=7)), ("0", timedelta(0))):
        assert Settings.from_env({"BLOB_GRACE": text}).blob_grace == expected, text
    for bad in ("0", "-1", "many", "1000001"):
        with pytest.raises(ConfigError, match="^MAX_FILES_PER_VERSION"):
            Settings.from_env({"MAX_FILES_PER_VERSION": bad})
    for bad in ("soon", "-1h", "1.5h", "24 hours", "366d"):
        with pytest.raises(ConfigError, match="^BLOB_GRACE"):
            Settings.from_env({"BLOB_GRACE": bad})


def test_upload_session_settings():
    """MAX_UPLOAD_SESSIONS (per key), MAX_UPLOAD_SESSIONS_TOTAL and UPLOAD_SESSION_TTL (resumable uploads)."""
    from datetime import timedelta

    defaults = Settings.from_env({})
    assert (defaults.max_upload_sessions, defaults.max_upload_sessions_total) == (16, 512)
    assert defaults.upload_session_ttl == timedelta(hours=24)
    tuned = Settings.from_env({"MAX_UPLOAD_SESSIONS": "2", "MAX_UPLOAD_SESSIONS_TOTAL": "3",
                               "UPLOAD_SESSION_TTL": "90s"})
    assert (tuned.max_upload_sessions, tuned.max_upload_sessions_total) == (2, 3)
    assert tuned.upload_session_ttl == timedelta(seconds=90)
    assert Settings.from_env({"UPLOAD_SESSION_TTL": "7d"}).upload_session_ttl == timedelta(days=7)
    for name in ("MAX_UPLOAD_SESSIONS", "MAX_UPLOAD_SESSIONS_TOTAL"):
        for bad in ("0", "-1", "many", "1.5"):
            with pytest.raises(ConfigError, match=f"^{name} "):
                Settings.from_env({name: bad})
    # 0 would expire every session at once.
    for bad in ("0", "soon", "-1h", "1.5h", "366d"):
        with pytest.raises(ConfigError, match="^UPLOAD_SESSION_TTL"):
            Settings.from_env({"UPLOAD_SESSION_TTL": bad})


def test_lease_ttl():
    """LEASE_TTL: seconds a reader's lease on stored content outlives its last renewal (app/leases.py)."""
    assert Settings.from_env({}).lease_ttl == 60
    assert Settings.from_env({"LEASE_TTL": "2"}).lease_ttl == 2
    assert Settings.from_env({"LEASE_TTL": " 300 "}).lease_ttl == 300
    # Below 2 s the heartbeat (every LEASE_TTL/3) would renew faster than a busy store answers.
    for bad in ("0", "1", "-5", "1.5", "60s", "soon", "86401"):
        with pytest.raises(ConfigError, match="^LEASE_TTL "):
            Settings.from_env({"LEASE_TTL": bad})


def test_count_flush_interval():
    """COUNT_FLUSH_INTERVAL: seconds between writes of a process's download counts (app/counts.py)."""
    assert Settings.from_env({}).count_flush_interval == 1.0
    assert Settings.from_env({"COUNT_FLUSH_INTERVAL": "0"}).count_flush_interval == 0
    assert Settings.from_env({"COUNT_FLUSH_INTERVAL": " 0.25 "}).count_flush_interval == 0.25
    assert Settings.from_env({"COUNT_FLUSH_INTERVAL": "30"}).count_flush_interval == 30
    for bad in ("-1", "soon", "1s", "nan", "inf", "3601"):
        with pytest.raises(ConfigError, match="^COUNT_FLUSH_INTERVAL "):
            Settings.from_env({"COUNT_FLUSH_INTERVAL": bad})
