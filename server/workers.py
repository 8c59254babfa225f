"""Where tensor work runs: a pool of worker processes, never the event loop.

Compressing a raw upload or reconstructing a long chain takes seconds of CPU; in a
process of its own it neither stalls the event loop nor competes for the server's GIL,
and its memory goes back to the system when the job ends. Workers are started with
``spawn`` (forking a process that runs an event loop and torch's thread pools is not
safe) and reopen the store from its URL. A ``memory://`` store exists only in this
process, so for it the same jobs run on threads instead.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from typing import Any, TypeVar

from excp.errors import WorkerFailed
from excp.store import Store
from server import jobs

T = TypeVar("T")


class Workers:
    def __init__(self, store: Store, count: int, push_cache: str) -> None:
        self.in_process = store.url.startswith("memory://")
        self.store_arg: str | Store = store if self.in_process else store.url
        self._count = count
        self._push_cache = push_cache
        self._pool = self._new_pool()

    def _new_pool(self) -> Executor:
        if self.in_process:
            return ThreadPoolExecutor(self._count, thread_name_prefix="excp-worker")
        return ProcessPoolExecutor(self._count, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=jobs.init_worker,
                                   initargs=(self._push_cache, os.getpid(),
                                             max(1, (os.cpu_count() or 1) // self._count)))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(store, *args)`` on a worker; a worker that died is replaced, and the
        request that lost it gets a 503 it may retry."""
        pool = self._pool
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, partial(fn, self.store_arg, *args))
        except BrokenProcessPool:
            if self._pool is pool:
                self._pool = self._new_pool()
                pool.shutdown(wait=False)
            raise WorkerFailed("a worker process died (out of memory?) while handling this request; "
                               "retry, or give the server more memory") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
