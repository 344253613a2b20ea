"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Checkpoints, tokenizers and dataset shards are read by other processes (a chat worker, a
training run on another rank, the web app) while they may be being written, and a crash or a
cancelled run must never leave a truncated file that looks complete. So every writer goes
through a hidden temp file in the target directory (same filesystem, so the rename is atomic),
fsyncs it, and renames it into place; on any error the temp file is removed.

A process killed mid-write cannot remove its temp file, so readers and writers of a directory
call `remove_stale_temps`: a temp file last written before this process started belongs to a
writer that is gone (a live writer keeps touching its file), and is deleted.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

# When this process began using these files: temp files older than that are not ours.
_STARTED = time.time()
TEMP_PATTERN = ".*.tmp"  # what atomic_path names its temp files: .<name>.<random>.tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; when the block succeeds it becomes `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temp file and move it to `path` once complete."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files of interrupted writes in `directory`; returns what was removed.

    Only files last modified before this process started: a write in progress in another
    process (a training run saving while a chat worker reads) keeps its file fresh.
    """
    removed = []
    folder = Path(directory)
    if not folder.is_dir():
        return removed
    for path in folder.glob(TEMP_PATTERN):
        with contextlib.suppress(OSError):  # gone already, or a folder we may only read
            if path.is_file() and path.stat().st_mtime < _STARTED:
                path.unlink()
                removed.append(path)
    return removed
