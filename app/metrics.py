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


class Tally:
    """The hot path's metric updates, kept in plain Python until ``flush`` hands them to prometheus-client.

    Made in place, a request's updates (the in-flight gauge twice, a histogram
    observation; a download's four more) each take a lock and a few method
    calls: about 5 us of a 57 us listing in the service (README, Performance),
    several times what they cost alone. Here a request appends its duration
    to a list. ``flush`` applies everything, exactly as if it had been applied
    at once: before every /metrics answer, so a single process always reports
    exact values, and every FLUSH_SECONDS (server.py), so with --workers the
    other workers' shared files are at most that late.
    """

    def __init__(self) -> None:
        # Per (resource, method label, status): durations not yet observed. Bounded as _durations is.
        self._durations: dict[tuple[object, str, int], list[float]] = {}
        self._added: dict[Counter, float] = {}
        self.active_downloads = 0

    def request(self, resource, method: str, status: int, seconds: float) -> None:
        """A request answered by ``resource`` (None when no route matched), as REQUEST_DURATION sees it."""
        key = (resource, method_label(method), status)
        pending = self._durations.get(key)
        if pending is None:
            pending = self._durations[key] = []
        pending.append(seconds)
        if len(pending) >= _MAX_PENDING:
            # Memory stays bounded whatever happens to the flushes.
            del self._durations[key]
            _observe(key, pending)

    def add(self, counter: Counter, amount: float = 1) -> None:
        self._added[counter] = self._added.get(counter, 0) + amount

    def flush(self, in_flight: int) -> None:
        """Apply every update so far; ``in_flight``: the requests being handled now."""
        durations, self._durations = self._durations, {}
        added, self._added = self._added, {}
        for key, pending in durations.items():
            _observe(key, pending)
        for counter, amount in added.items():
            counter.inc(amount)
        IN_FLIGHT.set(in_flight)
        ACTIVE_DOWNLOADS.set(self.active_downloads)


# How often a serving process applies its tally (server.py); how late another worker's figures may be.
FLUSH_SECONDS = 1.0
# Durations one key keeps before they are applied without waiting for a flush.
_MAX_PENDING = 4096


def _observe(key: tuple[object, str, int], durations: list[float]) -> None:
    child = request_duration(*key)
    for seconds in durations:
        child.observe(seconds)


TALLY = Tally()


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
