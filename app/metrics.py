"""Prometheus metrics (prometheus-client), correct under --workers N.

With several workers the supervisor points PROMETHEUS_MULTIPROC_DIR at a
private folder before starting them, so every worker's values land in shared
files and whichever worker answers /metrics reports the sum over all of them
(prometheus-client's multiprocess mode). Labels take only bounded values:
route templates, never paths or ids; algorithms are capped.
"""

from __future__ import annotations

import os
import re

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

DOWNLOADS = Counter("model_downloads", "Model downloads (responses that include byte 0)", ["algorithm"])
DOWNLOAD_BYTES = Counter("model_download_bytes", "File bytes sent by downloads, ranges included")
UPLOADS = Counter("model_uploads", "Model files uploaded and committed", ["algorithm"])
UPLOAD_BYTES = Counter("model_upload_bytes", "File bytes committed by uploads")
UPLOAD_SESSION_BYTES = Counter("model_service_upload_session_bytes",
                               "Bytes of upload session chunks accepted (made durable); discarded chunks not counted")
REGISTRATIONS = Counter("model_registrations", "Models registered (new names and new versions)", ["algorithm"])
ACTIVE_MODELS = Gauge("active_models_total", "Models whose status is active", multiprocess_mode="mostrecent")
STORAGE_USAGE = Gauge("storage_usage_bytes", "Bytes of stored model files, shared content counted once",
                      multiprocess_mode="mostrecent")
REQUEST_DURATION = Histogram(
    "api_request_duration_seconds", "Time to answer a request (for downloads, to send the whole body)",
    ["endpoint", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
IN_FLIGHT = Gauge("api_requests_in_flight", "Requests being handled", multiprocess_mode="livesum")
ACTIVE_DOWNLOADS = Gauge("active_downloads", "File bodies being sent", multiprocess_mode="livesum")
STORAGE_ERRORS = Counter("storage_operation_errors", "Storage operations that failed", ["operation"])

_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"}
_MAX_ALGORITHMS = 100
_seen_algorithms: set[str] = set()


def method_label(method: str) -> str:
    return method if method in _METHODS else "other"


# REQUEST_DURATION's child per (route resource, method, status): labels() builds
# a key and takes a lock on every call, about 2% of a get-by-id (bench/, py-spy).
# Bounded: resources are the app's routes (None: unmatched), methods and
# statuses are few.
_durations: dict[tuple[object, str, int], Histogram] = {}


def request_duration(resource, method: str, status: int) -> Histogram:
    """REQUEST_DURATION's child for a request answered by ``resource`` (None when no route matched)."""
    key = (resource, method_label(method), status)  # the label, not the method: clients send any token
    child = _durations.get(key)
    if child is None:
        endpoint = resource.canonical if resource is not None else "unmatched"
        child = _durations[key] = REQUEST_DURATION.labels(endpoint, key[1], str(status))
    return child


# DOWNLOADS' child per algorithm as stored (algorithm_label runs a regex);
# at most _MAX_CACHED of them, the rest looked up each time.
_downloads: dict[str, Counter] = {}
_MAX_CACHED = 1000


def downloads(algorithm: str) -> Counter:
    """DOWNLOADS' child for a model of ``algorithm``."""
    child = _downloads.get(algorithm)
    if child is None:
        child = DOWNLOADS.labels(algorithm_label(algorithm))
        if len(_downloads) < _MAX_CACHED:
            _downloads[algorithm] = child
    return child


def algorithm_label(algorithm: str) -> str:
    """A bounded label: algorithms are free text, so only the first 100 seen get their own."""
    label = re.sub(r"[^a-z0-9_.-]", "_", algorithm.lower())[:50]
    if label in _seen_algorithms:
        return label
    if len(_seen_algorithms) >= _MAX_ALGORITHMS:
        return "other"
    _seen_algorithms.add(label)
    return label


def exposition() -> tuple[bytes, str]:
    if MULTIPROCESS:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
