"""Files written whole: atomic writes (a crash mid-write never leaves a half-written result behind) and a lock
file that lets independent processes take turns on one path."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result over ``path`` in one rename. The file gets the mode a plain
    ``open(path, "w")`` would give it (0644 under the usual umask), not mkstemp's private 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# -- a lock file for independent processes --------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path):
    """Exclusive advisory lock on ``<path>.lock`` (POSIX ``flock``); a no-op where fcntl is missing.

    The lock file is removed when the lock is released. A waiter that opened the file before it was removed
    finds, once it holds the lock, that the path no longer names the file it locked, and starts over on a fresh
    one; so two processes never hold "the" lock at once and no ``.lock`` file stays behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: atomic rename still keeps the file whole, at worst the work is repeated
        yield
        return
    lock = Path(str(path) + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logger.info("sparselora: waiting for another process building %s", path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder removed this file while we waited: lock the path's current file instead
    try:
        yield
    finally:
        try:
            os.unlink(lock)  # while still holding the lock (see above)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing the descriptor releases the lock
