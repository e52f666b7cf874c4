"""Content checksums and whole-or-nothing files: what the weight store and its compressed copy use so
that a flipped byte is named, never turned into tokens, and a crash or a full disk never leaves a
half-written file under its final name.

    >>> checksum(memoryview(b"abc"))                      # 'xxh3_128:...' (the algorithm travels with it)
    >>> with atomic_file(path, nbytes) as f: f.write(data)   # PATH.tmp-PID, renamed over PATH when whole

xxh3_128 hashes a 100 MB buffer in 13 ms (7 GiB/s) where blake2b takes 216 ms (0.45 GiB/s) on the
same loaded 2-core box: it catches accidental corruption, which is all that is asked of it here.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import xxhash

from flexgen_graph.errors import DiskFullError

ALGORITHM = "xxh3_128"


def hasher():
    return xxhash.xxh3_128()


def checksum(data) -> str:
    """Checksum of a bytes-like object (a numpy array or memoryview is hashed in place)."""
    return f"{ALGORITHM}:{xxhash.xxh3_128(data).hexdigest()}"


def digest(h) -> str:
    return f"{ALGORITHM}:{h.hexdigest()}"


def file_checksum(path: Path) -> str:
    h = hasher()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return digest(h)


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def need_space(folder: Path, nbytes: int, what: str) -> None:
    """Refuse before writing nbytes into folder when its disk has less free."""
    free = free_bytes(folder)
    if free < nbytes:
        raise DiskFullError(folder, nbytes - free, f"{what} needs {nbytes} bytes, {free} are free")


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Remove the temporary files (atomic_file's PATH.tmp-PID) that a killed process left in folder: those whose
    process is gone (a live one may still be writing its own). Returns what was removed."""
    gone = []
    for tmp in folder.glob("*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        gone.append(tmp)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def atomic_file(path: Path, nbytes: int | None = None) -> Iterator[BinaryIO]:
    """A file written under a temporary name and renamed over path once whole; on any failure the
    temporary file is removed, and a full disk is a DiskFullError naming path and the bytes missing."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DiskFullError(path, max((nbytes or 0) - written, 1)) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
