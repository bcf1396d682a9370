#!/usr/bin/env python3
"""Fuzz upload chunk decoding, from protobuf bytes to the party's record store.

Every input goes through four decoders:

1. :func:`teepsi.engine.records.records_from_bytes` on the raw bytes: ``ValueError`` (its
   documented refusal of a partial record) only, and accepted payloads round-trip;
2. ``UploadChunk.FromString`` (``DecodeError`` allowed) followed by
   :func:`teepsi.server.streams.decode_upload` with the chunk's own fields: only
   ``ServiceError`` may escape;
3. :func:`decode_upload` on ``data[1:]`` with ``record_count`` = the payload's record
   count shifted by ``data[0] - 0x40`` (so counts near the truth, and wrong ones, are
   both common), sequence = the input length;
4. the whole server ``Upload`` handler (a real :class:`JobRegistry`, no network), on an
   event loop as the grpc.aio server runs it: the input is a stream of messages, each a
   u16 little-endian length and that many bytes, handed to the handler as raw bytes as
   the wire delivers them (the handler parses each chunk itself). The handler must
   either return a summary counting exactly the records sent (only if every message was
   a valid ``UploadChunk``), or abort the call with a gRPC status; any other exception
   escapes the handler and is a finding.

    python fuzz/fuzz_upload.py -max_total_time=3600 fuzz/work/upload fuzz/corpus/upload

See docs/fuzzing.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import struct
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import atheris
import numpy as np
from _support import amplifying_mutator, guard, with_defaults
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.engine.records import RECORD_BYTES, records_from_bytes, records_to_bytes
    from teepsi.protocol import SESSION_METADATA
    from teepsi.protocol import teepsi_pb2 as pb
    from teepsi.server.errors import ServiceError
    from teepsi.server.evidence import ServerEvidenceBundle
    from teepsi.server.jobs import JobRegistry
    from teepsi.server.limits import Limits
    from teepsi.server.service import PsiService
    from teepsi.server.streams import decode_upload

# Refused uploads are logged as warnings; keep the fuzzer's output readable.
logging.disable(logging.CRITICAL)

#: Small, so that the fuzzer reaches the per-party item limit.
MAX_ITEMS = 64
_U32 = 2**32


def _check_decoded(hi: np.ndarray, lo: np.ndarray, payload: bytes, count: int) -> None:
    assert len(hi) == len(lo) == count
    assert records_to_bytes(hi, lo) == payload, "decoded records do not round-trip"


def _raw_records(data: bytes) -> None:
    try:
        hi, lo = records_from_bytes(data)
    except ValueError:
        assert len(data) % RECORD_BYTES, "whole records refused"
        return
    _check_decoded(hi, lo, data, len(data) // RECORD_BYTES)


def _one_chunk(data: bytes) -> None:
    try:
        chunk = pb.UploadChunk.FromString(data)
    except DecodeError:
        return
    try:
        records = decode_upload(chunk.records, chunk.record_count, chunk.sequence)
    except ServiceError as exc:
        assert "\n" not in exc.message
        return
    _check_decoded(*records_from_bytes(records), chunk.records, chunk.record_count)


def _counted_payload(data: bytes) -> None:
    if not data:
        return
    payload = data[1:]
    count = (len(payload) // RECORD_BYTES + data[0] - 0x40) % _U32  # uint32 on the wire
    try:
        records = decode_upload(payload, count, len(data))
    except ServiceError as exc:
        assert "\n" not in exc.message
        return
    _check_decoded(*records_from_bytes(records), payload, count)


# --- the Upload handler ------------------------------------------------------------------


class _Aborted(Exception):
    """What a real grpc context.abort does: raise, ending the handler."""


class _Context:
    def __init__(self, token: bytes) -> None:
        self._metadata = ((SESSION_METADATA, token.hex()),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: Any, details: str) -> None:
        raise _Aborted(code, details)


class _InlineExecutor(concurrent.futures.Executor):
    """Runs the handler's blocking steps at once in the fuzzing thread (fast, and every
    exception surfaces in the handler as it would from the server's thread pool)."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:
            future.set_exception(exc)
        return future


_REGISTRY = JobRegistry(Limits(max_items_per_party=MAX_ITEMS, max_jobs=4))
_SERVICE = PsiService(
    registry=_REGISTRY,
    evidence=ServerEvidenceBundle(
        certificate_der=b"", collateral_json="", attestation="sim", certificate_sha256=b""
    ),
    client_verifier=None,
    require_client_attestation=False,
    executor=_InlineExecutor(),
)
_LOOP = asyncio.new_event_loop()
_jobs_started = 0


async def _messages(data: bytes, sent: list[Any]) -> AsyncIterator[bytes]:
    """The input's messages as raw bytes; ``sent`` gets each one parsed (None: garbage)."""
    pos = 0
    while pos + 2 <= len(data):
        (size,) = struct.unpack_from("<H", data, pos)
        pos += 2
        raw = data[pos : pos + size]
        pos += size
        try:
            sent.append(pb.UploadChunk.FromString(raw))
        except DecodeError:
            sent.append(None)
        yield raw


def _upload_stream(data: bytes) -> None:
    global _jobs_started
    _jobs_started += 1
    job_id = f"fuzz-{_jobs_started}"
    # Two parties, so the first upload completes without computing anything.
    outcome = _REGISTRY.join(job_id, "a", 2)
    sent: list[Any] = []
    try:
        summary = _LOOP.run_until_complete(
            _SERVICE.Upload(_messages(data, sent), _Context(outcome.token))
        )
    except _Aborted:
        summary = None
    finally:
        # The job is not needed past this input: drop it, as the deadline reaper would.
        with _REGISTRY._lock:
            job = _REGISTRY._jobs.get((job_id, b""))  # quick-mode jobs: no spec digest
            if job is not None:
                _REGISTRY._expire_locked(job, reason="fuzz input done")
    if summary is not None:
        assert None not in sent, "upload accepted a message that is not an UploadChunk"
        assert sent and sent[-1].last, "upload accepted without its last chunk"
        assert [c.sequence for c in sent] == list(range(len(sent))), "accepted out of order"
        assert summary.records_received == sum(c.record_count for c in sent)
        assert summary.records_received <= MAX_ITEMS


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    _raw_records(data)
    _one_chunk(data)
    _counted_payload(data)
    _upload_stream(data)


def main() -> None:
    argv = with_defaults(sys.argv, "upload", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
