"""A data provider's records sorted once with their rows: the order is exact on 128 bits
whatever the records (repeats, shared first digests, shared top bits), and the matching
finds exactly the rows whose record is in the result, in memory or spilled."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from teepsi.contract.normalization import Normalization
from teepsi.engine.intersect import record_order, sorted_unique_records
from teepsi.engine.sorted_records import SortedPart, SortedRecords
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import PARTITIONS, MemoryBudget, UnsortedRecordStore
from teepsi.engine.tables import TableFormat, TableSpec, read_table

SEEDS = (5, 6)


def _records(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Random records, with what a hostile or unlucky input holds: repeats, first digests
    shared by different records, and first digests that differ in their low bits only."""
    hi = rng.integers(0, 2**64, count, dtype=np.uint64)
    lo = rng.integers(0, 2**64, count, dtype=np.uint64)
    third = count // 3
    hi[:third], lo[:third] = hi[third : 2 * third], lo[third : 2 * third]  # repeats
    if third >= 80:
        hi[2 * third : 2 * third + 50] = hi[0]  # one first digest, many second ones
        hi[2 * third + 50 : 2 * third + 80] = hi[1] ^ rng.integers(1, 256, 30, dtype=np.uint64)
    return hi, lo


@pytest.mark.parametrize("count", [0, 1, 2, 3, 17, 4096, 100_000])
def test_record_order_is_the_stable_order_of_whole_records(count):
    hi, lo = _records(np.random.default_rng(count), count)
    order = record_order(hi, lo)
    assert np.array_equal(order, np.lexsort((np.arange(count), lo, hi)))


def test_every_record_sharing_one_first_digest_is_still_ordered_exactly():
    rng = np.random.default_rng(1)
    lo = rng.integers(0, 2**64, 5000, dtype=np.uint64)
    hi = np.full(5000, 7, dtype=np.uint64)
    assert np.array_equal(record_order(hi, lo), np.lexsort((np.arange(5000), lo, hi)))


def _expected_rows(hi, lo, rows, wanted: set[tuple[int, int]], every_row: bool) -> list[int]:
    seen: set[tuple[int, int]] = set()
    out = []
    for h, low, row in zip(hi.tolist(), lo.tolist(), rows.tolist(), strict=True):
        if (h, low) in wanted and (every_row or (h, low) not in seen):
            out.append(row)
        seen.add((h, low))
    return sorted(out)


@pytest.mark.parametrize("every_row", [True, False])
@pytest.mark.parametrize("spill", [False, True])
def test_rows_in_the_result_are_exactly_those_with_a_result_record(tmp_path, every_row, spill):
    rng = np.random.default_rng(9)
    hi, lo = _records(rng, 30_000)
    rows = np.arange(len(hi), dtype=np.uint64) * np.uint64(2) + np.uint64(5)
    distinct_hi, distinct_lo = sorted_unique_records(hi, lo)
    pick = rng.random(len(distinct_hi)) < 0.4
    # The result: some of our records, and records we do not have (never matched).
    others = rng.integers(0, 2**64, (2, 500), dtype=np.uint64)
    result_hi, result_lo = sorted_unique_records(
        np.concatenate([distinct_hi[pick], others[0]]),
        np.concatenate([distinct_lo[pick], others[1]]),
    )
    area = SpillArea(tmp_path)
    budget = MemoryBudget(64 * 1024 if spill else 1 << 30)
    store = UnsortedRecordStore(budget, area)
    for start in range(0, len(hi), 4_000):
        end = start + 4_000
        store.add_rows(hi[start:end], lo[start:end], rows[start:end])
    store.finish()
    assert store.spilled is spill
    records = SortedRecords(store, budget)
    uploaded = [(part.hi, part.lo) for part in records.parts()]
    assert np.array_equal(np.concatenate([h for h, _ in uploaded]), distinct_hi)
    assert np.array_equal(np.concatenate([low for _, low in uploaded]), distinct_lo)
    got = records.rows_in(result_hi, result_lo, every_row=every_row)
    wanted = set(zip(result_hi.tolist(), result_lo.tolist(), strict=True))
    assert got.tolist() == _expected_rows(hi, lo, rows, wanted, every_row)
    with pytest.raises(ValueError):
        next(records.parts())  # released with the matching
    area.close()


def test_a_part_finds_nothing_in_an_empty_result_and_in_an_empty_part():
    empty = np.empty(0, dtype=np.uint64)
    part = SortedPart.of(
        np.array([3], np.uint64), np.array([4], np.uint64), np.array([0], np.uint64)
    )
    assert part.found(empty, empty).size == 0
    assert SortedPart.of(empty, empty, empty).found(part.hi, part.lo).size == 0


def test_a_spilled_partition_is_read_again_not_taken(tmp_path):
    area = SpillArea(tmp_path)
    store = UnsortedRecordStore(MemoryBudget(1024), area)
    count = 10_000
    store.add_rows(
        np.arange(count, dtype=np.uint64) << np.uint64(50),
        np.arange(count, dtype=np.uint64),
        np.arange(count, dtype=np.uint64),
    )
    store.finish()
    assert store.spilled
    with pytest.raises(ValueError, match="spilled"):
        store.take_partition_rows(0)
    store.close()
    area.close()


def _table(tmp_path: Path, lines: list[str]):
    path = tmp_path / "in.txt"
    path.write_text("\n".join(lines) + "\n")
    spec = TableSpec(path=path, format=TableFormat.TEXT, normalization=Normalization())
    return read_table(spec)


def test_an_upload_pass_stopped_early_is_taken_up_again_whole(tmp_path):
    lines = [f"item{n}@example.com" for n in range(20_000)]
    with _table(tmp_path, lines) as whole:
        want_hi, want_lo = whole.key_records(SEEDS)
    with _table(tmp_path, lines) as table:
        table.hash(SEEDS)
        parts = table.distinct_records()
        for _ in range(PARTITIONS // 3):
            next(parts)
        parts.close()  # the upload broke off after a third of its parts
        got = list(table.distinct_records())
    assert np.array_equal(np.concatenate([h for h, _ in got]), want_hi)
    assert np.array_equal(np.concatenate([low for _, low in got]), want_lo)
