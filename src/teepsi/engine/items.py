"""Items on disk and on the wire.

An item is a line of UTF-8 text with surrounding whitespace (ASCII space, tab, CR,
LF, VT, FF) removed; blank lines are skipped. On the wire a batch of items is their
bytes, each followed by "\\n", which is unambiguous because items never contain one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

#: Largest item accepted, in bytes (after stripping).
MAX_ITEM_BYTES = 64 * 1024
#: Target payload size of one upload or result chunk.
CHUNK_BYTES = 1024 * 1024


class ItemError(ValueError):
    """Input that cannot be items; the message is one line saying where and what."""


def parse_items(data: bytes, *, source: str = "input") -> set[bytes]:
    """The distinct items in ``data`` (file contents): UTF-8 lines, stripped, non-blank."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ItemError(
            f"{source}: line {line}: not valid UTF-8 (byte offset {exc.start}); "
            "save the file as UTF-8"
        ) from None
    if b"\0" in data:
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise ItemError(f"{source}: line {line}: contains a NUL byte; items must be text")
    items = {line.strip() for line in data.split(b"\n")}
    items.discard(b"")
    if items:
        longest = max(items, key=len)
        if len(longest) > MAX_ITEM_BYTES:
            line = data.count(b"\n", 0, data.index(longest)) + 1
            raise ItemError(
                f"{source}: line {line}: item of {len(longest)} bytes exceeds the limit of "
                f"{MAX_ITEM_BYTES} bytes"
            )
    return items


def read_items(path: str | Path) -> set[bytes]:
    """Read the distinct items of a text file, one per line."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise ItemError(f"{p}: no such file; check the --data path") from None
    except IsADirectoryError:
        raise ItemError(
            f"{p}: is a directory, expected a text file with one item per line"
        ) from None
    except OSError as exc:
        raise ItemError(f"{p}: cannot read: {exc.strerror}") from None
    return parse_items(data, source=str(p))


def encode_batches(
    items: Iterable[bytes], *, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[tuple[bytes, int]]:
    """Yield (payload, item_count) batches of newline-terminated items of ~chunk_bytes."""
    batch: list[bytes] = []
    size = 0
    for item in items:
        batch.append(item)
        size += len(item) + 1
        if size >= chunk_bytes:
            yield b"\n".join(batch) + b"\n", len(batch)
            batch, size = [], 0
    if batch:
        yield b"\n".join(batch) + b"\n", len(batch)


def decode_batch(payload: bytes, item_count: int) -> list[bytes]:
    """Split a newline-terminated payload into items, checking the announced count."""
    if not payload:
        if item_count:
            raise ItemError(f"chunk announces {item_count} items but carries none")
        return []
    if not payload.endswith(b"\n"):
        raise ItemError("chunk payload does not end with a newline")
    items = payload[:-1].split(b"\n")
    if len(items) != item_count:
        raise ItemError(f"chunk announces {item_count} items but carries {len(items)}")
    return items


def mark_last(batches: Iterator[tuple[bytes, int]]) -> Iterator[tuple[bytes, int, bool]]:
    """Mark the final batch; an empty result is one empty, final batch."""
    pending = next(batches, (b"", 0))
    for following in batches:
        yield (*pending, False)
        pending = following
    yield (*pending, True)
