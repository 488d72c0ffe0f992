"""A writer's lease on a store: one lock object beside it (`<store>.lock`), on a local disk or on S3 alike.

The lock holds its owner and a heartbeat time, refreshed while the writer works. Every change to it is a
compare-and-swap against the version its writer last read, so two processes can never both hold it
(issue 16: breaking a stale lock used to be delete-then-create, and two breakers could both win):

- local disk: the compare and the write happen under an exclusive `flock` of `<store>.lock.guard`, which
  the kernel drops when its process dies, so the guard itself never goes stale; the lock is written to a
  temporary file and renamed into place, so no reader ever sees it half-written. The version is the
  sha256 of the lock's bytes (each body is unique: owner and time).
- S3: conditional writes. `If-None-Match: *` creates the lock, `If-Match: <ETag>` takes it over,
  refreshes it or deletes it, so S3 itself refuses all but one of several racing writers.
- any other fsspec filesystem: exclusive create where it has one, and a takeover that is not atomic.

A lock whose heartbeat is older than `stale_after` seconds, or whose owner was a process on this host that
is gone, belonged to a writer that died: the next writer takes it over, and of several racing takers
exactly one wins. A writer whose lock was taken over (judged dead while it was only stalled) learns it
at its next heartbeat or its next store write, whichever comes first, and stops with one line
(`LeaseLost`); what it committed before stays valid, since the new writer resumes from the commits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
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


class LeaseLost(SaepipeError):
    """This writer's lease was taken over by another writer; it must stop writing."""


class _LocalLock:
    """Compare-and-swap on a local file: every change happens under an exclusive flock of a guard file."""

    def __init__(self, path: str):
        self.path, self.guard_path = path, path + ".guard"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        import fcntl

        while True:
            fd = os.open(self.guard_path, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # `delete` removes the guard: retry if ours was unlinked while we waited for it
                same = os.path.samestat(os.stat(self.guard_path), os.fstat(fd))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            os.close(fd)

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            with open(self.path, "rb") as f:
                body = f.read()
        except FileNotFoundError:
            return None, None
        return body, hashlib.sha256(body).hexdigest()

    def _write(self, body: bytes) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, self.path)
        return hashlib.sha256(body).hexdigest()

    def create(self, body: bytes) -> str | None:
        with self._guard():
            return None if os.path.lexists(self.path) else self._write(body)

    def swap(self, version: str, body: bytes) -> str | None:
        with self._guard():
            return self._write(body) if self.read()[1] == version else None

    def delete(self, version: str) -> bool:
        with self._guard():
            if self.read()[1] != version:
                return False
            os.unlink(self.path)
            os.unlink(self.guard_path)  # last, still holding it: waiters on the old guard retry
            return True


def _s3_code(e: BaseException) -> str | None:
    """The S3 error code behind an exception s3fs translated (or None)."""
    for err in (e, e.__cause__, e.__context__):
        code = getattr(err, "response", {}).get("Error", {}).get("Code") if err is not None else None
        if code:
            return str(code)
    return None


_LOST_RACE = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "404", "409", "412"}


class _S3Lock:
    """Compare-and-swap on an S3 object through conditional writes on its ETag."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict | None:
        """The response, or None when S3 refused the write's condition (another writer won)."""
        try:
            return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
        except (OSError, ValueError) as e:
            if isinstance(e, FileExistsError) or _s3_code(e) in _LOST_RACE:
                return None
            raise
        finally:
            self.fs.invalidate_cache(self.path)

    def read(self) -> tuple[bytes | None, str | None]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return sync(self.fs.loop, get)
        except FileNotFoundError as e:
            if _s3_code(e) not in ("NoSuchKey", "404"):
                raise  # no such bucket: not a lock that is merely absent
            return None, None

    def create(self, body: bytes) -> str | None:
        resp = self._call("put_object", Body=body, IfNoneMatch="*")
        return None if resp is None else resp["ETag"]

    def swap(self, version: str, body: bytes) -> str | None:
        resp = self._call("put_object", Body=body, IfMatch=version)
        return None if resp is None else resp["ETag"]

    def delete(self, version: str) -> bool:
        return self._call("delete_object", IfMatch=version) is not None


class _PlainLock:
    """Any other fsspec filesystem: exclusive create if it has one; a takeover that is not atomic."""

    def __init__(self, fs: Any, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[bytes | None, str | None]:
        try:
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None, None
        return body, hashlib.sha256(body).hexdigest()

    def create(self, body: bytes) -> str | None:
        try:
            with self.fs.open(self.path, "xb") as f:
                f.write(body)
        except FileExistsError:
            return None
        return hashlib.sha256(body).hexdigest()

    def swap(self, version: str, body: bytes) -> str | None:
        if self.read()[1] != version:
            return None
        self.fs.pipe_file(self.path, body)
        return hashlib.sha256(body).hexdigest()

    def delete(self, version: str) -> bool:
        if self.read()[1] != version:
            return False
        self.fs.rm_file(self.path)
        return True


def _lock_for(fs: Any, path: str) -> _LocalLock | _S3Lock | _PlainLock:
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if "file" in protocols or "local" in protocols:
        return _LocalLock(path)
    if protocols & {"s3", "s3a"}:
        return _S3Lock(fs, path)
    return _PlainLock(fs, path)


def _parse(body: bytes | None) -> dict[str, Any] | None:
    try:
        held = json.loads(body) if body else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return held if isinstance(held, dict) else None


class Lease:
    """`with Lease(url):` holds the lock `url` (heartbeat thread) or raises LeaseHeld.

    While held, `check()` raises `LeaseLost` (one line) as soon as another writer has taken the lock over;
    the store writer calls it before every write and commit.
    """

    def __init__(self, url: str, stale_after: float = 120.0, storage_options: dict | None = None):
        self.fs, self.path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.lock = _lock_for(self.fs, self.path)
        self.url = url
        self.stale_after = stale_after
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._version: str | None = None
        self._lost_to: str | None = None
        self._mutex = threading.Lock()  # the heartbeat thread and `check` both move `_version`
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "heartbeat": time.time()}).encode()

    def read(self) -> dict[str, Any] | None:
        return _parse(self.lock.read()[0])

    def _read_settled(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lock and its version. A lock that does not parse may be one a writer of another kind (an
        older saepipe, a filesystem without atomic renames) has just created: give it ~0.5 s to change
        before calling it broken."""
        body, version = self.lock.read()
        for _ in range(20):
            if version is None or _parse(body) is not None:
                break
            time.sleep(0.025)
            again, newer = self.lock.read()
            if newer != version:
                body, version = again, newer
        return _parse(body), version

    def acquire(self) -> None:
        parent = self.path.rsplit("/", 1)[0]
        if parent and not self.fs.exists(parent):
            try:
                self.fs.makedirs(parent, exist_ok=True)
            except OSError as e:
                raise SaepipeError(
                    f"cannot create {parent} for the store's lock ({e}); check the path"
                ) from None
        for _ in range(10):  # only a lock released between our create and our read loops again
            version = self.lock.create(self._body())
            if version is not None:
                return self._start(version)
            held, seen = self._read_settled()
            if seen is None:
                continue  # released meanwhile: create again
            owner = str((held or {}).get("owner", "?"))
            fresh = held is not None and time.time() - float(held.get("heartbeat", 0)) < self.stale_after
            if fresh and not _dead_here(owner):
                raise LeaseHeld(owner)
            # Stale (its writer died): take it over. The swap succeeds only against the version we judged,
            # so of several processes breaking the same stale lock exactly one wins.
            version = self.lock.swap(seen, self._body())
            if version is None:
                raise LeaseHeld((self.read() or {}).get("owner", "?"))
            return self._start(version)
        raise LeaseHeld("?")

    def _start(self, version: str) -> None:
        self._version = version
        self._thread = threading.Thread(target=self._beat, daemon=True, name="saepipe-lease")
        self._thread.start()

    def _lost(self) -> None:
        """Record who holds the lock now (called with the mutex held, after a refused swap)."""
        self._lost_to = str((self.read() or {}).get("owner", "nobody (the lock was removed)"))

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after / 4):
            with self._mutex:
                if self._lost_to is not None:
                    return
                try:
                    version = self.lock.swap(str(self._version), self._body())
                except OSError:
                    continue  # a transient storage error: beat again at the next interval
                if version is None:
                    return self._lost()
                self._version = version

    def check(self) -> None:
        """Raise LeaseLost unless this writer still holds the lease (the lock is still the version it wrote)."""
        with self._mutex:
            if self._lost_to is None and self.lock.read()[1] != self._version:
                self._lost()
            if self._lost_to is not None:
                store = self.url.removesuffix(".lock")
                raise LeaseLost(
                    f"lost the lease on {store} to {self._lost_to}, which judged this writer dead (no heartbeat "
                    "within its --lock-stale-after) and took the store over; stopped before writing more (what was "
                    "committed is kept); rerun the same command to wait for that writer and use its result"
                )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self._lost_to is None and self._version is not None:
                self.lock.delete(self._version)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
