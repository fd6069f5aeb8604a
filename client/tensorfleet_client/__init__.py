"""Python client for the TensorFleet Model Service.

    from tensorfleet_client import ModelServiceClient

    with ModelServiceClient("http://models:8084") as client:
        model_id = client.push("model.pkl", name="churn", algorithm="random_forest",
                               metrics={"accuracy": 0.93})
        client.download(model_id, "/tmp/model.pkl")   # verified, resumable, parallel when large
        path = client.fetch("churn")                   # cached; one 304 request when unchanged

        client.push_folder("llama-ft/", name="llama-ft", algorithm="transformer")  # only new blobs are sent
        client.pull_folder("llama-ft", "/models/llama-ft", include=["*.json"])
        folder = client.fetch("llama-ft")              # a snapshot's folder in the cache

``AsyncModelServiceClient`` is the same client for asyncio code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BadRequest,
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    Forbidden,
    InsufficientSpace,
    ModelServiceError,
    NotCached,
    NotFound,
    PayloadTooLarge,
    PreconditionFailed,
    ProtocolError,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    Unauthorized,
)

if TYPE_CHECKING:
    from .core import AsyncModelServiceClient
    from .download import DownloadResult, RemoteFile
    from .snapshot import PullResult, PushResult
    from .sync import ModelServiceClient
    from .transport import DEFAULT_URL, RetryPolicy

# Imported on first use, not with the package: ``python -m tensorfleet_client pull`` starts with this file,
# and loading the folder, cache and push code it never runs cost a fifth of a small pull's start-up.
_LAZY = {
    "AsyncModelServiceClient": "core",
    "DEFAULT_URL": "transport",
    "DownloadResult": "download",
    "ModelServiceClient": "sync",
    "PullResult": "snapshot",
    "PushResult": "snapshot",
    "RemoteFile": "download",
    "RetryPolicy": "transport",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DEFAULT_URL",
    "AsyncModelServiceClient",
    "BadRequest",
    "ChecksumMismatch",
    "Conflict",
    "ConnectionFailed",
    "DownloadResult",
    "Forbidden",
    "InsufficientSpace",
    "ModelServiceClient",
    "ModelServiceError",
    "NotCached",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "PullResult",
    "PushResult",
    "ProtocolError",
    "RateLimited",
    "RemoteFile",
    "RetryPolicy",
    "ServerError",
    "ServiceUnavailable",
    "Unauthorized",
]
