"""Encrypted spill: record segments on disk, sealed with AES-GCM under a key held only in memory.

Each segment's associated data names its owner (store id, partition, segment number), so
a host cannot swap, reorder or replay segments between parties, partitions or jobs without
the decryption failing. Files are deleted when their store closes.

A process killed with SIGKILL cannot delete its spill area; its key died with it, so what
it leaves is ciphertext nobody can open. Each live area holds an exclusive ``flock`` on
its own directory for as long as it exists (the kernel drops it when the process dies),
so :func:`remove_stale_areas` can tell a dead server's area from a live one's, even when
several servers share one spill directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from teepsi.errors import TeepsiError

NONCE_BYTES = 12
#: Spill areas are directories named ``teepsi-spill-<16 hex>``; nothing else is ours.
AREA_PREFIX = "teepsi-spill-"
_AREA_NAME = re.compile(r"teepsi-spill-[0-9a-f]{16}")
#: A new area's name while it is being created (never swept: it is not yet locked).
_NEW_PREFIX = ".teepsi-spill-new-"
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class SpillError(TeepsiError):
    """A spilled segment could not be written or read back intact."""


class SpillArea:
    """A private directory of sealed segment files, with one random key per area."""

    def __init__(self, parent: str | Path | None = None) -> None:
        base = Path(parent if parent is not None else tempfile.gettempdir())
        suffix = secrets.token_hex(8)
        creating = base / f"{_NEW_PREFIX}{suffix}"
        os.mkdir(creating, 0o700)
        os.chmod(creating, 0o700)
        # Locked before it gets its sweepable name: no other server can take it for stale.
        # Where this fails (no flock here), no sweeper can lock (so remove) it either.
        self._lock_fd = -1
        with contextlib.suppress(OSError):
            self._lock_fd = os.open(creating, _OPEN_DIR)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._dir = base / f"{AREA_PREFIX}{suffix}"
        os.rename(creating, self._dir)
        self._cipher = AESGCM(AESGCM.generate_key(bit_length=256))
        self._lock = threading.Lock()
        self._counter = 0
        self.bytes_written = 0

    @property
    def path(self) -> Path:
        return self._dir

    def write(self, payload: bytes, label: bytes) -> Path:
        """Seal ``payload`` bound to ``label`` into a new file; return its path."""
        with self._lock:
            self._counter += 1
            path = self._dir / f"seg-{self._counter:08d}"
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = nonce + self._cipher.encrypt(nonce, payload, label)
        try:
            with open(path, "wb") as handle:
                handle.write(sealed)
        except OSError as exc:
            raise SpillError(f"cannot write spill segment in {self._dir}: {exc.strerror}") from None
        with self._lock:
            self.bytes_written += len(sealed)
        return path

    def read(self, path: Path, label: bytes) -> bytes:
        try:
            sealed = path.read_bytes()
        except OSError as exc:
            raise SpillError(f"cannot read spill segment {path.name}: {exc.strerror}") from None
        try:
            return self._cipher.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], label)
        except Exception:  # InvalidTag: tampered, swapped or truncated
            raise SpillError(f"spill segment {path.name} failed authentication") from None

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the lock, after the files are gone
            self._lock_fd = -1


@dataclass(frozen=True)
class StaleSweep:
    """What :func:`remove_stale_areas` removed."""

    areas: int = 0
    files: int = 0
    bytes: int = 0


def remove_stale_areas(parent: str | Path | None = None) -> StaleSweep:
    """Remove spill areas under ``parent`` whose process is gone (killed before it could).

    Only directories named ``teepsi-spill-<16 hex>`` whose lock nobody holds are removed; a
    live area, of this process or of another server sharing the directory, is locked.
    Older releases' areas (8-character names, no lock to tell live from dead) and anything
    else under ``parent`` are left alone. Raises OSError if ``parent`` cannot be listed.
    """
    base = Path(parent if parent is not None else tempfile.gettempdir())
    areas = files = size = 0
    with os.scandir(base) as entries:
        candidates = [
            entry.name
            for entry in entries
            if _AREA_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)
        ]
    for name in candidates:
        path = base / name
        try:
            fd = os.open(path, _OPEN_DIR)
        except OSError:
            continue  # gone meanwhile, or a symlink: not ours to follow
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # locked: a live server's area (or no flock here: leave it)
            found = _files_in(fd)
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                areas += 1
                files += len(found)
                size += sum(found)
        finally:
            os.close(fd)
    return StaleSweep(areas=areas, files=files, bytes=size)


def _files_in(dir_fd: int) -> list[int]:
    """Sizes of the regular files directly in a directory."""
    sizes = []
    for name in os.listdir(dir_fd):
        try:
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(info.st_mode):
            sizes.append(info.st_size)
    return sizes
