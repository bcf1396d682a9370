"""A data provider's input file, held open from its first read to its last.

The matching rows are read again from the input once the result has come (and again if
writing them to the output fails and they are rescued to a temporary file). Held open,
the file that is read again is the one that was hashed: deleting the input, or replacing
it by a rename, after the upload no longer loses the rows. A change made in place is
caught by its size and modification time, and refused.
"""

from __future__ import annotations

import os
import stat
import weakref
from pathlib import Path

from teepsi.engine.reading import open_error
from teepsi.engine.table_spec import TableError

#: Where Linux shows a process's open files as paths that polars can open.
_FD_DIR = Path("/proc/self/fd")


class PinnedInput:
    """An input file opened once; :attr:`path` reads that file whatever happens to its name.

    A directory (Parquet parts) is not held open: its stamp is the directory's own.
    """

    def __init__(self, path: Path) -> None:
        self.name = path
        self._fd = -1
        try:
            if path.is_dir():
                info = path.stat()
            else:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                weakref.finalize(self, os.close, self._fd)
                info = os.fstat(self._fd)
        except OSError as exc:
            raise open_error(path, exc) from None
        self._stamp = (info.st_size, info.st_mtime_ns)
        #: Bytes of the file when it was opened.
        self.size = info.st_size
        by_fd = _FD_DIR / str(self._fd)
        # Without /proc (some enclave runtimes) the name is read again, as before.
        held = self._fd >= 0 and stat.S_ISREG(info.st_mode) and by_fd.exists()
        #: The path to read the input by: the open file's, or its name.
        self.path = by_fd if held else path

    def check_unchanged(self) -> None:
        """Fail with one line if the input changed since it was opened."""
        try:
            info = os.fstat(self._fd) if self._fd >= 0 else self.name.stat()
        except OSError as exc:
            raise open_error(self.name, exc) from None
        if self._stamp != (info.st_size, info.st_mtime_ns):
            raise changed_error(self.name)


def changed_error(name: Path) -> TableError:
    """The input is not what was read and hashed: its matching rows cannot be read again."""
    return TableError(
        f"{name}: changed while this run read it; keep the input unchanged until the run "
        "ends, and run again"
    )
