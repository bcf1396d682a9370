"""The server's side of the chunked streams: upload chunks checked and stored one by one,
and one party's result cut into chunks under the release rules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from teepsi.engine.records import RECORD_BYTES
from teepsi.engine.store import RecordOrderError, RecordStore
from teepsi.protocol import teepsi_pb2 as pb
from teepsi.protocol.chunks import mark_last
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.release import Delivery, ReleaseStatus

_Message = TypeVar("_Message", bound=Message)

_RESULT_STATUS = {
    ReleaseStatus.RELEASED: pb.RELEASED,
    ReleaseStatus.COUNT_ONLY: pb.COUNT_ONLY,
    ReleaseStatus.NOT_RECIPIENT: pb.NOT_RECIPIENT,
    ReleaseStatus.BELOW_THRESHOLD: pb.BELOW_THRESHOLD,
}


def parse_request(message_class: type[_Message], raw: bytes) -> _Message:
    """A request message from its bytes; garbage is INVALID_ARGUMENT, not gRPC's INTERNAL."""
    try:
        return message_class.FromString(raw)
    except DecodeError:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"request is not a valid {message_class.DESCRIPTOR.full_name} message",
        ) from None


def result_chunks(delivery: Delivery) -> Iterator[bytes]:
    """One party's result as serialized ResultChunks, built one at a time."""
    result, status = delivery.result, delivery.status
    # Release rules, enforced here: records only when released; the size only when
    # the threshold was met.
    total = 0 if status is ReleaseStatus.BELOW_THRESHOLD else len(result)
    released = status is ReleaseStatus.RELEASED
    chunks = result.records.chunks() if released else iter(())
    for sequence, (payload, count, last) in enumerate(mark_last(chunks)):
        yield pb.ResultChunk(
            sequence=sequence,
            records=payload,
            record_count=count,
            total_records=total,
            result_sha256=result.sha256 if last and released else b"",
            last=last,
            party_distinct_records=delivery.distinct_records,
            status=_RESULT_STATUS[status],
            receipt_json=result.receipt_json if last else "",
            set_digest_salt=delivery.set_salt if last else b"",
            result_digest_salt=delivery.result_salt if last and released else b"",
        ).SerializeToString()


def take_chunk(raw: bytes, sequence: int, finished: bool, store: RecordStore, limit: int) -> bool:
    """Parse, check, decode and store one upload chunk (blocking); True if it was the last."""
    try:
        chunk = pb.UploadChunk.FromString(raw)
    except DecodeError:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"upload message {sequence} is not a valid {pb.UploadChunk.DESCRIPTOR.full_name} "
            "message",
        ) from None
    if finished:
        raise ServiceError(ErrorKind.INVALID_ARGUMENT, "chunk after the last chunk")
    if chunk.sequence != sequence:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {chunk.sequence} arrived out of order (expected {sequence}); "
            "chunks must be sent once each, in order",
        )
    records = decode_upload(chunk.records, chunk.record_count, chunk.sequence)
    if store.records + len(records) // RECORD_BYTES > limit:
        raise ServiceError(
            ErrorKind.RESOURCE_EXHAUSTED,
            f"more than {limit} items in one party's upload (the limit of this "
            "job: its spec's max_items_per_party or the server's --max-items)",
        )
    try:
        store.add_records(records)
    except RecordOrderError as exc:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {chunk.sequence}: {exc} (the teepsi client sends them so)",
        ) from None
    return bool(chunk.last)


def decode_upload(payload: bytes, count: int, sequence: int) -> bytes:
    """The chunk's records, checked to be ``count`` whole records (kept as bytes: the
    store takes them in their wire layout, without a copy)."""
    if len(payload) != count * RECORD_BYTES:
        raise ServiceError(
            ErrorKind.INVALID_ARGUMENT,
            f"chunk {sequence} announces {count} records but carries {len(payload)} bytes "
            f"(records are {RECORD_BYTES} bytes)",
        )
    return payload
