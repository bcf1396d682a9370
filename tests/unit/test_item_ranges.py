"""A text party's matching items over its budget: read again a range of keys at a time,
the ranges cut from the matching items themselves. The output is the one an unbounded
run and a plain reference give, whichever items match (also when the other parties pick
them all from one corner of the key space), and nothing is held beyond a range."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import teepsi.engine.item_ranges as item_ranges
import teepsi.engine.matching as matching
from teepsi.contract.normalization import TRIM_CHARS, Normalization
from teepsi.engine.intersect import intersect_records
from teepsi.engine.matching import find_matching_rows
from teepsi.engine.tables import TableSpec, read_table, table_from_frame, write_rows

SEEDS = (7, 8)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _run(path: Path, theirs: list[str], budget: int, normalization: Normalization):
    spec = TableSpec(path=path, normalization=normalization)
    with read_table(spec, memory_budget=budget) as table:
        import polars as pl

        other = table_from_frame(pl.DataFrame({"item": theirs}), spec)
        result = intersect_records([table.key_records(SEEDS), other.key_records(SEEDS)])
        other.close()
        rows = find_matching_rows(table, SEEDS, result[0], result[1])
        out = path.with_suffix(f".{budget}.out")
        write_rows(rows, spec, out)
        return rows, out.read_bytes()


def _reference(mine: list[str], theirs: list[str], casefold: bool) -> bytes:
    def key(item: str) -> str:
        item = item.strip(TRIM_CHARS)
        return item.lower() if casefold else item

    common = {key(i) for i in mine if key(i)} & {key(i) for i in theirs if key(i)}
    return b"".join(item.encode() + b"\n" for item in sorted(common, key=str.encode))


@pytest.mark.parametrize("casefold", [False, True])
@pytest.mark.parametrize("skewed", [False, True])
def test_ranges_give_the_unbounded_output(tmp_path, monkeypatch, casefold, skewed):
    rng = np.random.default_rng(4)
    mine = [f"User{n}@Example{n % 13}.com " for n in rng.integers(0, 40_000, 30_000)]
    # Skewed: the other parties share only keys from one corner, "user1....".
    picked = range(10_000, 20_000) if skewed else rng.integers(0, 40_000, 20_000).tolist()
    theirs = [f"user{n}@example{n % 13}.com" for n in picked]
    if not casefold:
        theirs = [item.replace("user", "User").replace("example", "Example") for item in theirs]
    normalization = Normalization(casefold=casefold)
    path = _write(tmp_path / "mine.txt", mine)
    pieces: list[int] = []
    real = item_ranges.ItemRanges.pieces

    def counted(self):
        for piece in real(self):
            pieces.append(len(piece))
            yield piece

    monkeypatch.setattr(item_ranges.ItemRanges, "pieces", counted)
    small, small_out = _run(path, theirs, 64 * 1024, normalization)
    assert len(pieces) > 4  # several ranges, each put in order alone
    assert max(pieces) < 3 * sum(pieces) / len(pieces)  # about even, skewed or not
    large, large_out = _run(path, theirs, 1 << 30, normalization)
    assert small_out == large_out == _reference(mine, theirs, casefold)
    assert len(small) == len(large) == small_out.count(b"\n")


def test_items_over_the_held_share_are_ranged_and_under_it_held(tmp_path, monkeypatch):
    lines = [f"k{n:06d}" for n in range(20_000)]
    path = _write(tmp_path / "in.txt", lines)
    made: list[object] = []
    real = item_ranges.ItemRanges

    def recording(*args, **kwargs):
        made.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(matching, "ItemRanges", recording)
    _run(path, lines[::2], 1 << 30, Normalization())
    assert not made  # 10,000 short items: held, ordered at once
    _, out = _run(path, lines[::2], 64 * 1024, Normalization())
    assert made and out == b"".join(f"{line}\n".encode() for line in lines[::2])


def test_no_matching_item_is_one_empty_piece(tmp_path):
    path = _write(tmp_path / "in.txt", [f"a{n}" for n in range(5000)])
    rows, out = _run(path, ["zzz"], 16 * 1024, Normalization())
    assert len(rows) == 0 and out == b""
    assert [len(piece) for piece in rows.pieces()] == [0]
