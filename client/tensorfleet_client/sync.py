"""``ModelServiceClient``: the async client, driven from synchronous code.

It owns an ``AsyncModelServiceClient`` and a private event loop on a daemon
thread; each method submits the async method's coroutine to that loop and
waits for it. There is no second implementation: the methods below are
generated from the async class and keep its signatures and docstrings.

If the waiting thread is interrupted (KeyboardInterrupt), the running call is
cancelled on the loop and given time to clean up (a download saves its
resume state) before the interrupt propagates.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from typing import Any, Coroutine

from .core import AsyncModelServiceClient

_CLEANUP_TIMEOUT = 30.0


class _LoopThread:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._guard:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="model-service-client", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        loop = self._ensure()
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("ModelServiceClient cannot be called from its own callbacks; "
                               "use AsyncModelServiceClient there")
        outcome: concurrent.futures.Future = concurrent.futures.Future()
        tasks: list[asyncio.Task] = []

        def start() -> None:
            task = loop.create_task(coro)
            tasks.append(task)

            def finished(t: asyncio.Task) -> None:
                if t.cancelled():
                    outcome.set_exception(asyncio.CancelledError())
                elif t.exception() is not None:
                    outcome.set_exception(t.exception())
                else:
                    outcome.set_result(t.result())

            task.add_done_callback(finished)

        loop.call_soon_threadsafe(start)
        try:
            return outcome.result()
        except BaseException:
            if not outcome.done():
                # Interrupted while waiting: cancel the call and let it clean up.
                loop.call_soon_threadsafe(lambda: tasks and tasks[0].cancel())
                try:
                    outcome.result(timeout=_CLEANUP_TIMEOUT)
                except BaseException:
                    pass
            raise

    def close(self) -> None:
        with self._guard:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class ModelServiceClient:
    """Synchronous client for the TensorFleet Model Service.

    Same methods, arguments and behaviour as ``AsyncModelServiceClient``
    (which see), without ``await``. Use as a context manager or call
    ``close()``. Progress callbacks run on the client's own thread.
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None, **options: Any) -> None:
        self._async = AsyncModelServiceClient(base_url, api_key, **options)
        self._runner = _LoopThread()

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def request_count(self) -> int:
        return self._async.request_count

    def close(self) -> None:
        try:
            self._runner.run(self._async.close())
        finally:
            self._runner.close()

    def __enter__(self) -> "ModelServiceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ModelServiceClient({self.base_url!r})"


_PUBLIC = ("health", "register_model", "upload", "push", "get_model", "get_by_name", "latest", "list_models",
           "search_models", "list_versions", "create_version", "update_model", "delete_model", "file_info",
           "statistics", "probe", "download", "fetch", "fetch_result", "push_folder", "manifest", "pull_folder",
           "upload_blob", "attach")


def _blocking(name: str):
    async_method = getattr(AsyncModelServiceClient, name)

    @functools.wraps(async_method)
    def method(self: ModelServiceClient, *args: Any, **kwargs: Any) -> Any:
        return self._runner.run(getattr(self._async, name)(*args, **kwargs))

    return method


for _name in _PUBLIC:
    setattr(ModelServiceClient, _name, _blocking(_name))
del _name
