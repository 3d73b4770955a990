"""One timing job per machine at a time, across processes (tune's workers, Ray workers on the
same node): a fair reader-writer lock on two files.

Building and evaluating hold the lock shared; timing holds it exclusive, so nothing else that
goes through this lock runs while a trial is timed. A timer waiting for its turn holds the
turnstile, so new builds queue behind it instead of starving it.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Iterator


def lock_dir() -> Path:
    """Per user and machine: every process on this machine that times meets here."""
    d = Path(tempfile.gettempdir()) / f"optcc-locks-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def exclusive_timing() -> Iterator[None]:
    """Hold while timing: waits until no other holder of either lock is working."""
    d = lock_dir()
    with _flock(d / "turnstile", fcntl.LOCK_EX):
        fd = os.open(d / "machine", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def shared_work() -> Iterator[None]:
    """Hold while building or evaluating: runs beside other work, never beside a timing."""
    d = lock_dir()
    with _flock(d / "turnstile", fcntl.LOCK_EX):
        pass
    with _flock(d / "machine", fcntl.LOCK_SH):
        yield
