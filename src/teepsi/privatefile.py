"""Writing files only their owner may read: created 0600, atomically, never via a symlink.

Receipts, their evidence and rollback state are written through :func:`write_private`:
a temporary file made by ``mkstemp`` (mode 0600, ``O_EXCL``) in the target's directory,
renamed over the target. ``os.replace`` replaces a planted symlink itself instead of
following it, and a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_private(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600; raises OSError."""
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
