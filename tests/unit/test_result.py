"""The intersection's result, merged into order from the partitions' runs within the
budget (teepsi.engine.result): correct order whatever the spread, chunks as they go out,
digests, sealing beyond the budget, and closing."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc

import numpy as np
import pytest

from teepsi.engine import result as result_module
from teepsi.engine.intersect import intersect_sorted_records, records_sha256_per_salt
from teepsi.engine.records import records_to_bytes
from teepsi.engine.result import (
    SealedPayloads,
    SortedResult,
    SortedRun,
    intersect_stores,
    merge_runs,
)
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import MemoryBudget, Partitioner, RecordStore, StoreClosed


def _sorted(hi, lo):
    order = np.lexsort((lo, hi))
    return hi[order], lo[order]


def _runs(blocks, hi, lo, assignment, count):
    """Records dealt to ``count`` runs by ``assignment``, each run sorted."""
    return [
        SortedRun(blocks, _sorted(hi[assignment == r], lo[assignment == r])) for r in range(count)
    ]


def _arrays(result):
    payload = b"".join(chunk for chunk, _ in result.chunks())
    pairs = np.frombuffer(payload, dtype=np.uint64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _records(kind, n, seed):
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    if kind == "random":
        hi = rng.integers(0, 2**64, n, dtype=np.uint64)
    elif kind == "few first digests":  # many records share a first digest, across runs
        hi = rng.integers(0, 5, n, dtype=np.uint64)
    else:  # a narrow range: what a party that steers its set would send
        hi = rng.integers(0, 1000, n, dtype=np.uint64) + np.uint64(2**63)
    pairs = np.unique(np.stack([hi, lo], axis=1), axis=0)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


@pytest.fixture
def small_steps(monkeypatch):
    """Tiny blocks, samples and steps: every boundary case is met at test sizes."""
    monkeypatch.setattr(result_module, "MERGE_BLOCK_RECORDS", 7)
    monkeypatch.setattr(result_module, "_SAMPLE_EVERY", 3)
    monkeypatch.setattr(result_module, "_STEP_SAMPLES", 5)


@pytest.mark.parametrize("kind", ["random", "few first digests", "narrow"])
@pytest.mark.parametrize("spread", ["even", "one run", "skewed"])
def test_merge_is_ascending_whatever_the_spread(small_steps, kind, spread):
    hi, lo = _records(kind, 3_000, 1)
    rng = np.random.default_rng(2)
    count = 9
    if spread == "even":
        assignment = rng.integers(0, count, len(hi))
    elif spread == "one run":
        assignment = np.full(len(hi), 4)
    else:  # most in one run, a few elsewhere, some runs empty
        assignment = np.where(rng.random(len(hi)) < 0.9, 0, rng.integers(5, count, len(hi)))
    blocks = SealedPayloads(MemoryBudget(1 << 30), None, 1 << 30)
    steps = list(merge_runs(_runs(blocks, hi, lo, assignment, count)))
    merged_hi = np.concatenate([h for h, _ in steps])
    merged_lo = np.concatenate([lo_ for _, lo_ in steps])
    expected = _sorted(hi, lo)
    assert np.array_equal(merged_hi, expected[0]) and np.array_equal(merged_lo, expected[1])
    # A step is bounded by the sampling (STEP_SAMPLES + runs) x SAMPLE_EVERY, however
    # the records are spread.
    assert max(len(h) for h, _ in steps) <= (5 + count) * 3


def test_merge_of_nothing_and_of_empty_runs():
    blocks = SealedPayloads(MemoryBudget(1 << 20), None, 1 << 20)
    empty = np.empty(0, np.uint64)
    assert list(merge_runs([])) == []
    assert list(merge_runs([SortedRun(blocks, (empty, empty)) for _ in range(3)])) == []


@pytest.mark.parametrize("chunk_records", [1, 5, 64, 10_000])
def test_result_chunks_and_digests(small_steps, chunk_records):
    hi, lo = _records("random", 1_000, 3)
    rng = np.random.default_rng(4)
    budget = MemoryBudget(1 << 30)
    blocks = SealedPayloads(budget, None, 1 << 30)
    runs = _runs(blocks, hi, lo, rng.integers(0, 4, len(hi)), 4)
    result = SortedResult.merged(runs, blocks, chunk_records, [b"", b"salt"])
    chunks = list(result.chunks())
    assert len(result) == len(hi) == sum(count for _, count in chunks)
    assert all(count == chunk_records for _, count in chunks[:-1])
    assert all(len(payload) == 16 * count for payload, count in chunks)
    expected = _sorted(hi, lo)
    assert b"".join(payload for payload, _ in chunks) == records_to_bytes(*expected)
    assert result.sha256_per_salt == records_sha256_per_salt(
        expected[0], expected[1], [b"", b"salt"]
    )
    assert list(result.chunks()) == chunks  # read again, for the next party
    result.close()
    assert budget.held == 0


def test_empty_result_has_no_chunks_and_the_empty_digest():
    blocks = SealedPayloads(MemoryBudget(1 << 20), None, 1 << 20)
    result = SortedResult.merged([], blocks, 16, [b"", b"s"])
    assert len(result) == 0 and list(result.chunks()) == []
    assert result.sha256_per_salt == [hashlib.sha256().digest(), hashlib.sha256(b"s").digest()]


def test_beyond_the_budget_runs_and_chunks_are_sealed_ciphertext(small_steps, tmp_path):
    """A budget with no room: every run block and chunk is sealed on disk (no record
    bytes readable there), the result is still right, and closing deletes the files."""
    hi, lo = _records("random", 2_000, 5)
    budget = MemoryBudget(1 << 30, runtime_bytes=1 << 30)  # no room for records at all
    spill = SpillArea(tmp_path)
    blocks = SealedPayloads(budget, spill, result_module.held_limit(budget))
    runs = _runs(blocks, hi, lo, np.random.default_rng(6).integers(0, 5, len(hi)), 5)
    assert blocks.sealed == len(blocks) > 0
    on_disk = b"".join(path.read_bytes() for path in spill.path.iterdir())
    needle = records_to_bytes(hi[:1], lo[:1])
    assert needle not in on_disk
    result = SortedResult.merged(runs, blocks, 100, [b""])
    assert result.sealed_chunks == len(list(result.chunks())) == 20
    assert np.array_equal(_arrays(result), _sorted(hi, lo))
    # The runs' blocks were deleted as the merge read them; only the chunks are left.
    assert len(list(spill.path.iterdir())) == 20
    result.close()
    assert not any(spill.path.iterdir()) and budget.held == 0
    spill.close()


def test_held_limit_caps_what_stays_in_memory(tmp_path):
    budget = MemoryBudget(1 << 30)
    spill = SpillArea(tmp_path)
    payloads = SealedPayloads(budget, spill, held_limit=1000)
    for _ in range(5):
        payloads.append(b"x" * 400)
    assert payloads.sealed == 3 and budget.held == 800
    assert [payloads.read(i) for i in range(5)] == [b"x" * 400] * 5
    assert payloads.read(0, drop=True) == b"x" * 400 and budget.held == 400
    assert payloads.read(4, drop=True) == b"x" * 400
    assert len(list(spill.path.iterdir())) == 2
    with pytest.raises(ValueError, match="dropped"):
        payloads.read(4)
    payloads.close()
    assert budget.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_a_closed_result_refuses_reads_and_a_read_under_way_finishes(tmp_path):
    budget = MemoryBudget(1 << 30)
    spill = SpillArea(tmp_path)
    payloads = SealedPayloads(budget, spill, held_limit=0)  # every payload sealed
    payloads.append(b"y" * 64)
    reading, release = threading.Event(), threading.Event()
    original = spill.read

    def slow_read(path, label):
        reading.set()
        release.wait(5)
        return original(path, label)

    spill.read = slow_read  # type: ignore[method-assign]
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(payloads.read(0)))
    reader.start()
    reading.wait(5)
    payloads.close()  # while the read runs: its file stays until it is done
    assert any(spill.path.iterdir())
    release.set()
    reader.join(5)
    assert got == [b"y" * 64]
    assert not any(spill.path.iterdir())
    with pytest.raises(StoreClosed):
        payloads.read(0)
    with pytest.raises(StoreClosed):
        payloads.append(b"z")
    spill.close()


def test_intersection_of_stores_whose_sets_crowd_one_range(monkeypatch, tmp_path):
    """Parties that put every record in a narrow range (one range partition, had the
    result been split by value) still get the right result, and the intersection's
    memory is a few blocks' and steps', not the result's."""
    monkeypatch.setattr(result_module, "MERGE_BLOCK_RECORDS", 128)
    monkeypatch.setattr(result_module, "_SAMPLE_EVERY", 64)
    monkeypatch.setattr(result_module, "_STEP_SAMPLES", 16)
    n, common = 600_000, 200_000
    hi, lo = _records("narrow", n, 7)
    budget = MemoryBudget(1 << 30, runtime_bytes=(1 << 30) - (64 << 10))  # 64 KiB for records
    spill = SpillArea(tmp_path)
    partitioner = Partitioner()
    stores = []
    for rows in (slice(0, (n + common) // 2), slice((n - common) // 2, n)):
        store = RecordStore(budget, spill, partitioner)
        store.add(hi[rows], lo[rows])
        store.finish()
        stores.append(store)
    # Once untraced first: what a first call loads (modules, the thread pool's code) is
    # not the merge's memory.
    intersect_stores(stores, spill=spill, chunk_records=4096, salts=[b""]).result.close()
    tracemalloc.start()
    try:
        found = intersect_stores(stores, spill=spill, chunk_records=4096, salts=[b""])
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    middle = slice((n - common) // 2, (n + common) // 2)
    assert np.array_equal(_arrays(found.result), (hi[middle], lo[middle]))
    assert found.result.sealed_chunks > 0
    assert (
        traced_peak < common * 16
    )  # under the result itself (the old sort held it whole, and more)
    found.result.close()
    for store in stores:
        store.close()
    assert budget.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_a_failed_partition_lets_every_run_go(tmp_path, monkeypatch):
    budget = MemoryBudget(1 << 30)
    partitioner = Partitioner()
    hi, lo = _records("random", 5_000, 8)
    stores = []
    for _ in range(2):
        store = RecordStore(budget, None, partitioner)
        store.add(hi, lo)
        stores.append(store)
    calls = []

    def failing(parts):
        calls.append(1)
        if len(calls) == 10:
            raise RuntimeError("boom")
        return original(parts)

    original = intersect_sorted_records
    monkeypatch.setattr(result_module, "intersect_sorted_records", failing)
    held = budget.held
    with pytest.raises(RuntimeError, match="boom"):
        intersect_stores(stores, spill=None, chunk_records=1024)
    assert budget.held == held  # the runs made before and after the failure are let go
