"""Records on the wire: how an upload or a result is cut into ``UploadChunk`` and
``ResultChunk`` messages (each chunk's records as 16-byte little-endian records)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

#: Records per upload or result chunk: 4 MiB messages, well under gRPC's limit we set.
RECORDS_PER_CHUNK = 256 * 1024


def iter_record_chunks(
    hi: npt.NDArray[np.uint64], lo: npt.NDArray[np.uint64], *, records_per_chunk: int
) -> Iterator[tuple[bytes, int]]:
    """(payload, record count) of each chunk of these records, in order."""
    for start in range(0, len(hi), records_per_chunk):
        end = min(start + records_per_chunk, len(hi))
        yield np.stack([hi[start:end], lo[start:end]], axis=1).tobytes(), end - start


def mark_last(chunks: Iterable[tuple[bytes, int]]) -> Iterator[tuple[bytes, int, bool]]:
    """Flag the final chunk; nothing at all becomes one empty, final chunk."""
    iterator = iter(chunks)
    pending = next(iterator, (b"", 0))
    for following in iterator:
        yield (*pending, False)
        pending = following
    yield (*pending, True)
