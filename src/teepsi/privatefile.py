"""Private files: the one recipe every secret, result, receipt and state file is written by.

A file is written under a fresh temporary name in its own directory, created with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and mode 0600 (then set to exactly 0600 whatever the
umask), flushed, and renamed over the target with :func:`os.replace`. So:

* nobody ever sees the file with wider permissions, not even for a moment;
* a reader sees the old file or the whole new one, never a half-written one;
* a symlink planted at the target is replaced itself; its target is never written;
* a crash leaves at most a hidden ``.NAME.*.tmp`` file, never a truncated target.

:func:`check_output_path` is the matching check made *before* a run starts, so a result
is never computed for a place it cannot be written to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from teepsi.errors import TeepsiError

__all__ = [
    "PRIVATE_MODE",
    "OutputPathError",
    "check_output_path",
    "open_private_append",
    "private_writer",
    "sync_directory",
    "write_private",
]

PRIVATE_MODE = 0o600

_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class OutputPathError(TeepsiError, ValueError):
    """A path a result cannot be written to; the message is one line naming it."""


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def private_writer(path: str | Path, *, replace: bool = True) -> Iterator[BinaryIO]:
    """A binary handle whose contents become ``path`` (0600) when the block ends cleanly.

    With ``replace=False`` an existing ``path`` (a symlink included) is refused with
    FileExistsError, checked at the rename: the file is only ever created, never
    overwritten. On any error the temporary file is removed and ``path`` is untouched.
    """
    target = Path(path)
    directory = _directory(target)
    temporary = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(temporary, _CREATE_FLAGS, PRIVATE_MODE)
    try:
        # The umask may have narrowed the mode further; make it exactly 0600.
        os.fchmod(fd, PRIVATE_MODE)
        with os.fdopen(fd, "wb") as handle:
            fd = -1  # the handle owns it now
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(temporary, target)
        else:
            # link() fails if the target exists (also as a dangling symlink): no overwrite.
            os.link(temporary, target, follow_symlinks=False)
            temporary.unlink()
    except BaseException:
        if fd >= 0:
            os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(directory)


def write_private(path: str | Path, data: bytes, *, replace: bool = True) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600 (see :func:`private_writer`)."""
    with private_writer(path, replace=replace) as handle:
        handle.write(data)


def open_private_append(path: str | Path) -> BinaryIO:
    """``path`` opened for appending; created 0600 if new. Never through a symlink."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, PRIVATE_MODE)
    try:
        if os.fstat(fd).st_size == 0:
            os.fchmod(fd, PRIVATE_MODE)  # a new file: exactly 0600 whatever the umask
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def sync_directory(directory: str | Path) -> None:
    """Make a rename or a new file in ``directory`` survive a crash (best effort: some
    filesystems cannot sync a directory, and the file's own bytes are synced anyway)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_output_path(path: str | Path, *, flag: str, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, a path a result could not be written to.

    The directory must exist and be writable; the path must not be a directory, and not
    the same file as any of ``inputs`` (compared by device and inode, so hard links,
    symlinks and relative spellings of one file are caught).
    """
    target = Path(path)
    directory = _directory(target)
    where = f"{flag} {path}"
    try:
        directory_stat = os.stat(directory)
    except OSError:
        raise OutputPathError(f"{where}: directory {directory} does not exist") from None
    if not stat.S_ISDIR(directory_stat.st_mode):
        raise OutputPathError(f"{where}: {directory} is not a directory")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise OutputPathError(f"{where}: directory {directory} is not writable")
    try:
        target_stat = os.stat(target)
    except FileNotFoundError:
        return  # a new file (or a dangling symlink, which is replaced, not followed)
    except OSError as exc:
        raise OutputPathError(f"{where}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(target_stat.st_mode):
        raise OutputPathError(f"{where}: is a directory; name a file")
    for source in inputs:
        with contextlib.suppress(OSError):
            source_stat = os.stat(source)
            if (source_stat.st_dev, source_stat.st_ino) == (
                target_stat.st_dev,
                target_stat.st_ino,
            ):
                raise OutputPathError(
                    f"{where}: is the input file {source}; writing there would destroy it"
                )
