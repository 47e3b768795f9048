"""One exclusive cross-process lock, used by the kernel build (``fused._cpp``) and vico's output folders.

An ``flock`` on a lock file: the kernel drops it when its holder dies, however it dies, so a
lock left by a killed process is taken over by the next one with nothing to clean up. The
holder writes its PID into the file, so a process that finds the lock held can say who holds it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Iterator


class LockHeld(RuntimeError):
    """``path`` is locked by another live process, ``pid`` (None when it wrote none yet)."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path} is held by process {pid if pid is not None else '(unknown)'}")
        self.path, self.pid = path, pid


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


@contextlib.contextmanager
def exclusive_lock(path: str | Path, wait: bool = False, on_wait: Callable[[int | None], None] | None = None,
                   remove: bool = False) -> Iterator[Path]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the ``with`` block.

    Held by another process: with ``wait`` call ``on_wait(holder_pid)`` and block until it is free,
    else raise ``LockHeld``. ``remove``: delete the file on release (a later locker that opened the
    old file notices it is gone and retries on the new one). Without ``fcntl`` (Windows) nothing is
    locked."""
    path = Path(path)
    try:
        import fcntl
    except ImportError:
        yield path
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise LockHeld(path, _holder(fd)) from None
                if on_wait is not None:
                    on_wait(_holder(fd))
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:  # the previous holder may have removed the file between our open and our lock
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
        except BaseException:
            os.close(fd)
            raise
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        if remove:
            with contextlib.suppress(OSError):
                path.unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
