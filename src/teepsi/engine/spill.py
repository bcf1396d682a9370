"""Encrypted spill: record segments on disk, sealed with AES-GCM under a key held only in memory.

Each segment's associated data names its owner (store id, partition, segment number), so
a host cannot swap, reorder or replay segments between parties, partitions or jobs without
the decryption failing. Files are deleted when their store closes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12


class SpillError(Exception):
    """A spilled segment could not be written or read back intact."""


class SpillArea:
    """A private directory of sealed segment files, with one random key per area."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="teepsi-spill-", dir=parent))
        os.chmod(self._dir, 0o700)
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
