"""Keep the forward pass busy: work that feeds it runs ahead in one thread, work it feeds runs behind in
another (issue 18).

- `ahead(items)`: iterate a generator (packing text into contexts) in a background thread, at most
  `depth` items ahead of the consumer.
- `Behind`: run jobs (cast checks, checksums, the shard write and its commit) one at a time in a writer
  thread, at most one job in flight: submitting the next job first waits for the previous one, so memory
  holds at most the shard being computed and the shard being written.

A job's exception is re-raised in the calling thread, unchanged, at the next `submit` or `wait`, and no
later job runs; so a store's commits stay in order and a failure reads exactly as it would inline.
`SAEPIPE_SYNC_HARVEST=1` turns both off (everything runs inline in the calling thread): the simple
reference the overlapped harvest is tested against.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
_DONE = object()


def overlapped() -> bool:
    """False when `SAEPIPE_SYNC_HARVEST=1` asks for the inline reference path."""
    return os.environ.get("SAEPIPE_SYNC_HARVEST", "") not in ("1", "true", "yes")


def ahead(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """`items`, produced in a background thread up to `depth` items ahead; errors surface here."""
    if not overlapped():
        yield from items
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        """Hand `item` over; False once the consumer has left (then nothing may block on a full queue)."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(e)

    thread = threading.Thread(target=produce, daemon=True, name="saepipe-pack")
    thread.start()
    try:
        while (item := out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class Behind:
    """`with Behind() as behind: behind.submit(fn, *args)`: jobs run in order in one writer thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="saepipe-writer") if overlapped() else None
        self._last: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous job (raising its error), then start `fn(*args)` behind the caller."""
        self.wait()
        if self._pool is None:
            fn(*args)
        else:
            self._last = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the job in flight is done; re-raise its exception in this thread."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def __enter__(self) -> Behind:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        try:
            if exc_type is None:
                self.wait()  # a clean exit has every job done (and raises a job's error)
        finally:
            if self._pool is not None:
                # Leaving on an error: the job in flight finishes (a write is never cut short by us; a
                # kill may cut it, and the store's commit-last protocol covers that), nothing new starts.
                self._pool.shutdown(wait=True, cancel_futures=True)
