"""A result's records as the client takes them in: copied out a chunk at a time into
arrays the stream's announced total sizes, digested as they come, and refused with one
line when a hostile or broken server sends more, less, partial or impossible records."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from teepsi.client.connection import _Records
from teepsi.client.party import PsiClientError
from teepsi.engine.records import records_from_bytes, records_to_bytes


def _payloads(count: int, chunk: int) -> tuple[list[bytes], bytes]:
    rng = np.random.default_rng(count)
    hi = np.sort(rng.integers(0, 2**64, count, dtype=np.uint64))
    lo = rng.integers(0, 2**64, count, dtype=np.uint64)
    whole = records_to_bytes(hi, lo)
    step = chunk * 16
    return [whole[at : at + step] for at in range(0, len(whole), step)] or [b""], whole


def test_records_arrive_whole_and_digested_as_sent():
    payloads, whole = _payloads(10_000, 777)
    records = _Records(10_000)
    for payload in payloads:
        records.take(payload)
    assert records.complete
    want_hi, want_lo = records_from_bytes(whole)
    assert np.array_equal(records.hi, want_hi) and np.array_equal(records.lo, want_lo)
    assert records.digest.digest() == hashlib.sha256(whole).digest()


def test_fewer_records_than_announced_are_incomplete():
    payloads, _ = _payloads(1000, 100)
    records = _Records(1001)
    for payload in payloads:
        records.take(payload)
    assert not records.complete


@pytest.mark.parametrize("bad", ["more", "partial"])
def test_more_or_partial_records_are_refused_in_one_line(bad):
    payloads, _ = _payloads(1000, 100)
    records = _Records(1000 if bad == "partial" else 999)
    with pytest.raises(PsiClientError, match="result stream is corrupted") as refused:
        for payload in payloads:
            records.take(payload[:-3] if bad == "partial" else payload)
    assert "\n" not in str(refused.value)


def test_a_total_no_process_can_hold_is_refused_in_one_line():
    with pytest.raises(PsiClientError, match="more than this process can hold"):
        _Records(2**62)
