"""Local files every stage writes the same way: atomically, and only into an `--out` that can take them.

A reader must never see half a file (STYLE principle 5): each file is written under a temporary name
beside it (`<name>.partial`, zarr's own convention, so a rerun overwrites what a killed run left and the
cleanups that drop `*.partial` files find it) and renamed into place. safetensors' own `save_file` writes
through a temporary `.tmpXXXXXX` of its own that a kill leaves behind under a fresh name, so tensors are
serialised to bytes (`safetensors.*.save`) and written with `write_bytes_atomic`. `check_out_dir` refuses an unusable
`--out` before a stage spends minutes loading a model or reading a store.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from saepipe.errors import SaepipeError


def write_atomic(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str, encoding: str | None = None) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def check_out_dir(
    out: str | Path,
    file_hint: str,
    foreign: Callable[[Path], str | None] | None = None,
    probe: bool = True,
) -> None:
    """Refuse an `--out` that is an existing file (`file_hint` says what to give instead), a directory
    that `foreign(path)` says holds something else (its answer completes "a non-empty directory that
    ..."), or, with `probe`, a place where no file can be created."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SaepipeError(f"--out {out} is an existing file; {file_hint}")
    if foreign is not None and path.is_dir() and (why := foreign(path)):
        raise SaepipeError(f"--out {out} is a non-empty directory that {why}; choose a new path")
    if probe:
        probe_writable(out, path if path.exists() else next(p for p in path.absolute().parents if p.exists()))


def probe_writable(out: str | Path, parent: Path) -> None:
    """Refuse `--out` unless a file can really be created in `parent` (os.access says yes to root even
    where nothing can be written)."""
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".saepipe-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise SaepipeError(
            f"--out {out}: cannot write in {parent} ({e.strerror}); choose a writable path"
        ) from None
