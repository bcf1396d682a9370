"""The text data provider's fast path: blocks read without joins, the trim skipped where
nothing can need it, text rows without a row column, membership by a packed sort, and
the distinct output ordered without comparing every key.

Each shortcut is checked against the plain computation it replaces.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import teepsi.engine.key_order as key_order_module
import teepsi.engine.reading as reading
from teepsi.contract.normalization import TRIM_CHARS, Normalization
from teepsi.engine.intersect import intersect_records, members_of_sorted
from teepsi.engine.key_order import distinct_key_order, key_order
from teepsi.engine.matching import find_matching_rows
from teepsi.engine.records import normalized_keys, stripped_item_keys
from teepsi.engine.tables import TEXT_COLUMN, TableError, TableSpec, read_table, table_from_frame

SEEDS = (5, 6)
SMALL_BUDGET = 64 * 1024  # blocks of 64 KiB, batches sealed to disk
NORMALISATIONS = {
    "trim": Normalization(),
    "casefold": Normalization(casefold=True),
    "nfc": Normalization(nfc=True),
    "trim,casefold,nfc": Normalization(casefold=True, nfc=True),
    "none": Normalization(trim=False),
}


def _expected_items(data: bytes) -> list[str]:
    lines = (line.strip(TRIM_CHARS) for line in data.decode().split("\n"))
    return [line for line in lines if line]


def _lines(rng: np.random.Generator, count: int) -> list[str]:
    """Items with repeats, case, accents (composed and not), and whitespace in places."""
    lines = []
    for n in rng.integers(0, count // 2, count):
        item = f"User{n}@Exämple{n % 7}.com" if n % 3 else f"user{n}@exa\u0308mple.com"
        lines.append(item)
    return lines


def _text_file(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode())
    return path


def _items(path: Path, budget: int) -> list[str]:
    spec = TableSpec(path=path)
    found = [items.to_list() for items in reading.text_items(spec, budget)]
    return [item for block in found for item in block]


def test_text_items_are_the_stripped_non_blank_lines_in_any_block_size(tmp_path):
    rng = np.random.default_rng(1)
    lines = _lines(rng, 30_000)
    # Blocks with nothing to strip, and blocks with blanks, CRs, tabs and blank lines.
    for at in range(20_000, 30_000, 7):
        lines[at] = ["", "  ", f"\t{lines[at]} ", f"{lines[at]}\r", "a\rb", "\x0c"][at % 6]
    lines[25_000] = " " * (200 * 1024) + "padded"  # longer than a block: read on to its end
    data = "\n".join(lines).encode()  # the last line without a newline
    path = tmp_path / "a.txt"
    path.write_bytes(data)
    assert _items(path, SMALL_BUDGET) == _items(path, 1 << 30) == _expected_items(data)
    crlf = _text_file(tmp_path / "crlf.txt", lines, "\r\n")
    assert _items(crlf, SMALL_BUDGET) == _expected_items(data.replace(b"\n", b"\r\n"))


def test_text_errors_name_the_line_of_a_later_block(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "TEXT_BLOCK_BYTES", 64 * 1024)
    lines = [f"item{i}" for i in range(40_000)]
    lines[39_000] = "bad\0item"
    path = _text_file(tmp_path / "a.txt", lines)
    with pytest.raises(TableError, match="line 39001: contains a NUL"):
        _items(path, SMALL_BUDGET)


def _every_character() -> pl.Series:
    points = [p for p in range(1, sys.maxunicode + 1) if not 0xD800 <= p <= 0xDFFF]
    return pl.Series(TEXT_COLUMN, [chr(p) for p in points if chr(p) not in TRIM_CHARS])


@pytest.mark.parametrize("name", NORMALISATIONS)
def test_stripped_items_keys_are_their_normalised_keys_for_every_character(name):
    """NFC and lower-casing never make ASCII whitespace nor an empty key, so the trim and
    the empty-key test can be skipped for stripped items: every code point, alone,
    between letters and after a base letter (where NFC composes)."""
    normalization = NORMALISATIONS[name]
    chars = _every_character()
    for items in (chars, "a" + chars + "b", "e" + chars):
        items = items.alias(TEXT_COLUMN)
        expected = normalized_keys(items.to_frame(), [TEXT_COLUMN], normalization)
        assert expected.null_count() == 0
        assert stripped_item_keys(items, normalization).equals(expected, check_names=False)


@given(st.lists(st.text(alphabet="ab\x00\u00e9\uffff", max_size=40), max_size=80))
@settings(max_examples=200, deadline=None)
def test_distinct_key_order_is_the_first_of_each_key_bytewise(keys):
    order = distinct_key_order(pl.Series(keys, dtype=pl.String)).tolist()
    first: dict[str, int] = {}
    for at, key in enumerate(keys):
        first.setdefault(key, at)
    assert order == [first[key] for key in sorted(first, key=lambda k: k.encode())]


def test_distinct_key_order_drops_repeats_among_keys_sharing_a_prefix():
    keys = ["p" * 20 + "b", "q", "p" * 20 + "a", "p" * 20 + "b", "q", "p" * 16, "p" * 16]
    assert distinct_key_order(pl.Series(keys)).tolist() == [5, 2, 0, 1]


def test_members_of_unsorted_records_by_packed_sort():
    rng = np.random.default_rng(2)
    hi = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
    lo = rng.integers(0, 2**64, 50_000, dtype=np.uint64)
    # Values that differ only in the low bits the row index takes, and repeated records.
    hi[:1000] = (hi[:1000] & ~np.uint64(0xFFFF)) | np.uint64(7)
    hi[1000:2000] = hi[:1000] + np.uint64(1)
    hi[2000:3000], lo[2000:3000] = hi[:1000], lo[:1000]
    pick = rng.choice(len(hi), 20_000, replace=False)
    sorted_hi, first = np.unique(hi[pick], return_index=True)  # sorted, distinct
    sorted_lo = lo[pick][first]
    result = set(zip(sorted_hi.tolist(), sorted_lo.tolist(), strict=True))
    expected = np.array([pair in result for pair in zip(hi.tolist(), lo.tolist(), strict=True)])
    found = members_of_sorted(hi, lo, sorted_hi, sorted_lo)
    assert found.tolist() == expected.tolist()
    assert expected[:3000].any() and not expected.all()


def _output(mine: Path, theirs: Path, normalization: Normalization, budget: int) -> list[str]:
    spec = TableSpec(path=mine, normalization=normalization)
    other = TableSpec(path=theirs, normalization=normalization)
    with read_table(spec, memory_budget=budget) as table, read_table(other) as them:
        hi, lo, _ = intersect_records([table.key_records(SEEDS), them.key_records(SEEDS)])
        spilled = table.spilled
        rows = find_matching_rows(table, SEEDS, hi, lo).frame()[TEXT_COLUMN].to_list()
    assert spilled == (budget == SMALL_BUDGET)
    return rows


def _reference(mine: list[str], theirs: list[str], normalization: Normalization) -> list[str]:
    def keys(lines: list[str]) -> set[str]:
        items = pl.Series(TEXT_COLUMN, _expected_items("\n".join(lines).encode()))
        found = normalized_keys(items.to_frame(), [TEXT_COLUMN], normalization)
        return set(found.drop_nulls().to_list())

    return sorted(keys(mine) & keys(theirs), key=str.encode)


@pytest.mark.parametrize("name", NORMALISATIONS)
def test_text_output_over_budget_is_the_distinct_normalised_items_bytewise(tmp_path, name):
    rng = np.random.default_rng(3)
    mine, theirs = _lines(rng, 20_000), _lines(rng, 8_000)
    mine[10:20] = ["", "   ", " \t "] + [f" {item}\r" for item in mine[13:20]]
    theirs[:3] = [item.upper() for item in mine[:3]]  # meet under case folding only
    a = _text_file(tmp_path / "a.txt", mine, "\r\n")
    b = _text_file(tmp_path / "b.txt", theirs)
    normalization = NORMALISATIONS[name]
    expected = _reference(mine, theirs, normalization)
    assert len(expected) > 1000
    assert _output(a, b, normalization, SMALL_BUDGET) == expected
    assert _output(a, b, normalization, 1 << 30) == expected
    # The same items in memory (run_party_items), and no common item at all.
    frame = pl.DataFrame({TEXT_COLUMN: mine})
    in_memory = table_from_frame(frame, TableSpec(path=a, normalization=normalization))
    with in_memory as table, read_table(TableSpec(path=b, normalization=normalization)) as them:
        hi, lo, _ = intersect_records([table.key_records(SEEDS), them.key_records(SEEDS)])
        rows = find_matching_rows(table, SEEDS, hi, lo).frame()
        assert rows[TEXT_COLUMN].to_list() == expected
        none = find_matching_rows(table, SEEDS, hi[:0], lo[:0]).frame()
        assert none.columns == [TEXT_COLUMN] and not len(none)


@given(st.lists(st.text(alphabet="ab\x00\u00e9", max_size=20), max_size=80))
@settings(max_examples=200, deadline=None)
def test_key_order_sorted_a_value_range_at_a_time_is_the_same(keys):
    """Ranges of 3 keys: splitters between equal prefixes, ranges of one number, ties."""
    series = pl.Series(keys, dtype=pl.String)
    expected = key_order(series).tolist()
    distinct = distinct_key_order(series).tolist()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(key_order_module, "_PREFIX_STEP", 3)
        assert key_order(series).tolist() == expected
        assert distinct_key_order(series).tolist() == distinct
