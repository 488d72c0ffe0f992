"""A writer's lease on a store: one exclusive lock object beside it, on a local disk or on S3 alike.

The lock is created with an exclusive create (`O_EXCL` locally, `If-None-Match: *` on S3), holds the
owner and a heartbeat time, and is refreshed while the writer works. A lock whose heartbeat is older than
`stale_after` seconds, or whose owner was a process on this host that is gone, belonged to a writer that
died; the next writer breaks it and resumes the store.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import fsspec

from saepipe.errors import SaepipeError


def _dead_here(owner: str) -> bool:
    """A lock from a process on this host that no longer runs (killed -9): no need to wait it out."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class LeaseHeld(Exception):
    """Another live writer holds the lease."""


class Lease:
    """`with Lease(url):` holds the lock `url` (heartbeat thread) or raises LeaseHeld."""

    def __init__(self, url: str, stale_after: float = 120.0, storage_options: dict | None = None):
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.url = url
        self.stale_after = stale_after
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode()

    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _read_settled(self, tries: int = 20) -> dict[str, Any] | None:
        """The lock's content; a lock just created may be empty for a moment before its owner writes it,
        and must not be mistaken for a broken one. Still unreadable after ~0.5 s: it is broken."""
        for _ in range(tries):
            held = self.read()
            if held is not None or not self.fs.exists(self.path):
                return held
            time.sleep(0.025)
        return None

    def _try_create(self) -> bool:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(self._body())
            return True
        except FileExistsError:
            return False

    def acquire(self) -> None:
        parent = self.path.rsplit("/", 1)[0]
        if parent and not self.fs.exists(parent):
            try:
                self.fs.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise SaepipeError(
                    f"cannot create {parent} for the store's lock ({e}); check the path"
                ) from None
        if self._try_create():
            return self._start()
        held = self._read_settled()
        fresh = held is not None and time.time() - float(held.get("heartbeat", 0)) < self.stale_after
        if held is not None and fresh and not _dead_here(str(held.get("owner", ""))):
            raise LeaseHeld(held.get("owner", "?"))
        # Stale (its writer died): break it. The exclusive create below still lets only one taker win.
        self.fs.rm_file(self.path)
        if not self._try_create():
            raise LeaseHeld((self.read() or {}).get("owner", "?"))
        self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, daemon=True, name="saepipe-lease")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            held = self.read()
            if held is None or held.get("owner") != self.owner:
                return  # broken by someone who judged us dead; the store's commits keep data safe
            self.fs.pipe_file(self.path, self._body())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        held = self.read()
        if held is not None and held.get("owner") == self.owner:
            self.fs.rm_file(self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
