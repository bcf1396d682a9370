"""The streaming data provider: key columns read in batches within a memory budget,
spilled (encrypted) beyond it, keys hashed once, matching rows read again in key order.

Every format, on inputs larger than the budget, gives output byte-identical to the same
run within a large budget and to a plain polars reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

import teepsi.engine.matching as matching
import teepsi.engine.output as output
import teepsi.engine.reading as reading
import teepsi.engine.tables as tables
from teepsi.contract.normalization import TRIM_CHARS, Normalization
from teepsi.engine.intersect import (
    intersect_records,
    is_strictly_increasing,
    sorted_unique_records,
)
from teepsi.engine.matching import find_matching_rows, matching_rows
from teepsi.engine.records import hash_keys, normalized_keys
from teepsi.engine.spill import SpillArea
from teepsi.engine.store import (
    PARTITIONS,
    MemoryBudget,
    Partitioner,
    RecordOrderError,
    RecordStore,
    UnsortedRecordStore,
)
from teepsi.engine.tables import (
    TableError,
    TableFormat,
    TableSpec,
    read_table,
    write_rows,
)

SEEDS = (11, 22)
SMALL_BUDGET = 64 * 1024  # far below what the tables below hold: forces spilling
ROWS = 20_000


def _emails(rng: np.random.Generator, count: int, space: int) -> list[str]:
    # Repeats, mixed case and surrounding blanks: normalisation and semi-join both matter.
    ids = rng.integers(0, space, count)
    return [f" User{n}@Example{n % 13}.com " if n % 5 == 0 else f"user{n}@ex.com" for n in ids]


def _frames() -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(3)
    mine = _emails(rng, ROWS, ROWS)
    mine[7] = ""  # never matches
    theirs = _emails(rng, ROWS // 2, ROWS)
    ours = pl.DataFrame(
        {
            "email": mine,
            "n": [str(i) for i in range(ROWS)],
            "note": [f"a fairly long note for row {i}, to make strings long" for i in range(ROWS)],
        }
    ).with_columns(
        pl.when(pl.col("n").str.ends_with("3")).then(None).otherwise("email").alias("email")
    )
    return ours, pl.DataFrame({"email": theirs})


def _write(frame: pl.DataFrame, path: Path) -> Path:
    if path.suffix == ".txt":
        path.write_text("".join(f"{v}\n" for v in frame["email"].fill_null("   ")))
    elif path.suffix == ".csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    return path


FORMATS = {"txt": TableFormat.TEXT, "csv": TableFormat.CSV, "parquet": TableFormat.PARQUET}
NORMALISATION = Normalization(trim=True, casefold=True)


def _spec(path: Path) -> TableSpec:
    fmt = FORMATS[path.suffix[1:]]
    keys = () if fmt is TableFormat.TEXT else ("email",)
    return TableSpec(path=path, format=fmt, key_columns=keys, normalization=NORMALISATION)


def _job(tmp_path: Path, ext: str, budget: int) -> tuple[bytes, bool]:
    """Both parties through read, hash, intersect and matching; our output file's bytes."""
    ours, theirs = _frames()
    a = _spec(_write(ours, tmp_path / f"a.{ext}"))
    b = _spec(_write(theirs, tmp_path / f"b.{ext}"))
    with read_table(a, memory_budget=budget) as mine, read_table(b) as other:
        hi, lo, _ = intersect_records([mine.key_records(SEEDS), other.key_records(SEEDS)])
        rows = find_matching_rows(mine, SEEDS, hi, lo)
        spilled = mine.spilled
    # As the client writes them: a piece at a time, read again after the table is closed.
    out = tmp_path / f"out-{budget}.{ext}"
    write_rows(rows, a, out)
    at_once = tmp_path / f"at-once-{budget}.{ext}"
    write_rows(rows.frame(), a, at_once)
    assert out.read_bytes() == at_once.read_bytes()
    return out.read_bytes(), spilled


def _reference(tmp_path: Path, ext: str) -> bytes:
    """What a data engineer would write with polars, no privacy: a semi-join, key order."""
    ours, theirs = _frames()

    def norm(column: pl.Expr) -> pl.Expr:
        return column.str.to_lowercase().str.strip_chars(TRIM_CHARS)

    wanted = theirs.select(norm(pl.col("email")).alias("k")).filter(pl.col("k") != "")
    out = tmp_path / f"reference.{ext}"
    if ext == "txt":
        keys = ours.select(norm(pl.col("email")).alias("k")).join(wanted, on="k", how="semi")
        items = keys["k"].unique().sort()
        out.write_bytes("".join(f"{k}\n" for k in items).encode())
    else:
        if ext == "csv":  # read back as teepsi reads it: every column as text
            ours = pl.read_csv(tmp_path / "a.csv", infer_schema=False)
        rows = (
            ours.with_row_index("i")
            .with_columns(norm(pl.col("email")).alias("k"))
            .join(wanted.unique(), on="k", how="semi")
            .sort(["k", "i"])
            .drop("i", "k")
        )
        write_rows(rows, _spec(tmp_path / f"a.{ext}"), out)
    return out.read_bytes()


@pytest.mark.parametrize("ext", ["txt", "csv", "parquet"])
def test_over_budget_output_is_identical_to_unbounded_and_to_polars(tmp_path, ext):
    small, spilled = _job(tmp_path, ext, SMALL_BUDGET)
    large, spilled_large = _job(tmp_path, ext, 1 << 30)
    assert spilled and not spilled_large
    assert small == large == _reference(tmp_path, ext)
    assert small.count(b"\n") > 100 or ext == "parquet"


def test_text_output_written_in_pieces_is_identical_to_polars(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "TEXT_WRITE_ROWS", 7)  # many pieces, the last one partial
    written, _ = _job(tmp_path, "txt", SMALL_BUDGET)
    assert written.count(b"\n") > 10 * output.TEXT_WRITE_ROWS
    assert written == _reference(tmp_path, "txt")


#: Too small to hold the matching rows: they are read again from the input when written.
REREAD_BUDGET = 256 * 1024


def _matching(
    tmp_path: Path, ext: str, budget: int = REREAD_BUDGET
) -> tuple[matching.MatchingRows, TableSpec]:
    ours, theirs = _frames()
    a = _spec(_write(ours, tmp_path / f"a.{ext}"))
    b = _spec(_write(theirs, tmp_path / f"b.{ext}"))
    with read_table(a, memory_budget=budget) as mine, read_table(b) as other:
        hi, lo, _ = intersect_records([mine.key_records(SEEDS), other.key_records(SEEDS)])
        return find_matching_rows(mine, SEEDS, hi, lo), a


@pytest.mark.parametrize("budget", [REREAD_BUDGET, 1 << 30])
@pytest.mark.parametrize("ext", ["csv", "parquet"])
@pytest.mark.parametrize("size", [997, 4096, ROWS])
def test_pieces_of_any_size_are_the_rows_in_key_order(tmp_path, ext, size, budget):
    rows, _ = _matching(tmp_path, ext, budget)
    pieces = list(rows.pieces(size))
    assert len(pieces) == -(-len(rows) // size) and all(len(p) <= size for p in pieces)
    assert pl.concat(pieces).equals(rows.frame()) and len(rows) > 1000


@pytest.mark.parametrize("budget", [REREAD_BUDGET, 1 << 30])
@pytest.mark.parametrize("ext", ["txt", "csv", "parquet"])
def test_output_written_in_small_pieces_is_identical_to_polars(tmp_path, monkeypatch, ext, budget):
    """A budget's share of a few rows: many pieces, all from one scan of the input, or
    from the rows held (within a large budget: no scan at all)."""
    rows, spec = _matching(tmp_path, ext, budget)
    scans: list[int] = []
    real = tables.Table.scan

    def counting(self):
        scans.append(1)
        return real(self)

    monkeypatch.setattr(tables.Table, "scan", counting)
    monkeypatch.setattr(rows, "piece_rows", lambda: 97)
    out = tmp_path / f"out.{ext}"
    write_rows(rows, spec, out)
    assert out.read_bytes() == _reference(tmp_path, ext)
    rescans = 0 if ext == "txt" or budget > REREAD_BUDGET else 1
    assert len(rows) > 10 * 97 and len(scans) == rescans


def test_piece_rows_are_a_share_of_the_budget(tmp_path):
    rows, _ = _matching(tmp_path, "csv")
    sample = pl.read_csv(tmp_path / "a.csv", infer_schema=False, n_rows=1024)
    row_bytes = (sample.estimated_size() + 16 * len(sample) * sample.width) // len(sample)
    share = REREAD_BUDGET // matching.PIECE_BUDGET_SHARE
    assert rows.piece_rows() == share // row_bytes


def test_no_matching_rows_is_one_empty_piece_with_the_header(tmp_path):
    ours, _ = _frames()
    spec = _spec(_write(ours, tmp_path / "a.csv"))
    with read_table(spec) as table:
        hi, lo = table.key_records(SEEDS)
        rows = find_matching_rows(table, SEEDS, hi[:0], lo[:0])
    assert len(rows) == 0 and [len(p) for p in rows.pieces()] == [0]
    write_rows(rows, spec, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_text() == "email,n,note\n"


def test_input_changed_before_a_piece_is_read_is_refused(tmp_path):
    rows, spec = _matching(tmp_path, "csv")
    spec.path.write_text("email,n,note\nx,1,y\n" + spec.path.read_text())
    with pytest.raises(TableError, match="changed while this run read it"):
        write_rows(rows, spec, tmp_path / "out.csv")
    assert not (tmp_path / "out.csv").exists()


def test_rows_held_within_the_budget_are_written_whatever_the_input_becomes(tmp_path):
    rows, spec = _matching(tmp_path, "csv", 1 << 30)
    want = _reference(tmp_path, "csv")
    spec.path.write_text("email,n,note\nx,1,y\n")
    write_rows(rows, spec, tmp_path / "out.csv")
    assert (tmp_path / "out.csv").read_bytes() == want


@pytest.mark.parametrize("budget", [SMALL_BUDGET, 1 << 30])
def test_upload_parts_are_one_ascending_distinct_upload_the_server_takes(tmp_path, budget):
    """The hashed records come unsorted; their range partitions, each sorted, concatenate to
    the canonical order the server's store requires (it refuses anything else)."""
    ours, _ = _frames()
    spec = _spec(_write(ours, tmp_path / "a.csv"))
    with read_table(spec, memory_budget=budget) as table:
        table.hash(SEEDS)
        parts = list(table.distinct_records())
        assert table.spilled is (budget == SMALL_BUDGET)
        count, own = table.own_set(b"salt")
    hi = np.concatenate([h for h, _ in parts])
    lo = np.concatenate([low for _, low in parts])
    assert is_strictly_increasing(hi, lo)
    keys = normalized_keys(pl.read_csv(spec.path, infer_schema=False), ["email"], NORMALISATION)
    want_hi, want_lo = sorted_unique_records(*hash_keys(keys.drop_nulls(), SEEDS))
    assert np.array_equal(hi, want_hi) and np.array_equal(lo, want_lo) and count == len(hi)
    server = RecordStore(MemoryBudget(1 << 30), None, Partitioner(), salt=b"salt")
    for part in parts:
        server.add(*part)  # part by part, as the upload's chunks arrive
    assert server.records == count and server.set_sha256 == own
    with pytest.raises(RecordOrderError):
        server.add(*parts[0])


def test_unsorted_store_partitions_are_ranges_in_order(tmp_path):
    rng = np.random.default_rng(5)
    hi = rng.integers(0, 1 << 63, 50_000, dtype=np.uint64) * np.uint64(2)
    lo = rng.integers(0, 1 << 63, 50_000, dtype=np.uint64)
    hi, lo = np.concatenate([hi, hi[:100]]), np.concatenate([lo, lo[:100]])  # repeats
    rows = np.arange(len(hi), dtype=np.uint64) * np.uint64(3)  # any ascending positions
    area = SpillArea(tmp_path)
    store = UnsortedRecordStore(MemoryBudget(64 * 1024), area)
    for start in range(0, len(hi), 7_000):
        end = start + 7_000
        store.add_rows(hi[start:end], lo[start:end], rows[start:end])
    store.finish()
    assert store.spilled
    with pytest.raises(TypeError):
        store.add(hi[:1], lo[:1])  # a record without its row
    loaded = [store.partition_rows(p) for p in range(PARTITIONS)]
    parts = [sorted_unique_records(h, low) for h, low, _ in loaded]
    store.close()
    area.close()
    got_hi = np.concatenate([h for h, _ in parts])
    got_lo = np.concatenate([low for _, low in parts])
    want_hi, want_lo = sorted_unique_records(hi, lo)
    assert np.array_equal(got_hi, want_hi) and np.array_equal(got_lo, want_lo)
    # Each record kept its row, and a partition's rows are in arrival (row) order.
    for h, low, at in loaded:
        assert np.all(at[1:] > at[:-1])
        assert np.array_equal(h, hi[at // np.uint64(3)]) and np.array_equal(
            low, lo[at // np.uint64(3)]
        )


def test_keys_are_hashed_once_for_upload_and_matching(tmp_path, monkeypatch):
    ours, _ = _frames()
    spec = _spec(_write(ours, tmp_path / "a.csv"))
    calls: list[int] = []
    real = tables.hash_keys

    def counting(keys: pl.Series, seeds: tuple[int, int]):
        calls.append(len(keys))
        return real(keys, seeds)

    monkeypatch.setattr(tables, "hash_keys", counting)
    with read_table(spec, memory_budget=SMALL_BUDGET) as table:
        hi, lo = table.key_records(SEEDS)
        table.own_set(b"salt")
        hashed = sum(calls)
        matching_rows(table, SEEDS, hi, lo)
    assert hashed == table.rows_with_key and sum(calls) == hashed  # nothing hashed twice


def test_spilled_batches_are_ciphertext_and_go_on_close(tmp_path):
    ours, _ = _frames()
    spec = _spec(_write(ours, tmp_path / "a.txt"))
    spill = tmp_path / "spill"
    spill.mkdir()
    table = read_table(spec, memory_budget=SMALL_BUDGET, spill_dir=spill)
    table.hash(SEEDS)
    files = [p for p in spill.rglob("*") if p.is_file()]
    assert files and table.budget.held <= SMALL_BUDGET
    for path in files:
        data = path.read_bytes()
        assert b"@ex.com" not in data and b"ARROW" not in data
    table.close()
    assert list(spill.iterdir()) == []


def test_input_changed_before_matching_is_refused(tmp_path):
    ours, _ = _frames()
    path = _write(ours, tmp_path / "a.csv")
    with read_table(_spec(path)) as table:
        hi, lo = table.key_records(SEEDS)
        path.write_text("email,n\nx,1\n" + path.read_text())
        with pytest.raises(TableError, match="changed while this run read it"):
            matching_rows(table, SEEDS, hi, lo)


def test_text_errors_name_the_line_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(reading, "TEXT_BLOCK_BYTES", 64 * 1024)
    lines = [f"item{i}" for i in range(40_000)]
    path = tmp_path / "a.txt"
    data = "\n".join(lines).encode()
    path.write_bytes(data.replace(b"item30000\n", b"bad\xffline\n"))
    with pytest.raises(TableError, match="line 30001: not valid UTF-8"):
        read_table(TableSpec(path=path), memory_budget=SMALL_BUDGET)
    lines[30_000] = "bad\0line"
    path.write_text("\n".join(lines))
    with pytest.raises(TableError, match="line 30001: contains a NUL"):
        read_table(TableSpec(path=path), memory_budget=SMALL_BUDGET)


def test_csv_utf8_error_found_without_reading_the_whole_file(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(
        b"email,n\n" + b"".join(b"u%d@x,%d\n" % (i, i) for i in range(5000)) + b"\xff,1\n"
    )
    with pytest.raises(TableError, match="line 5002: not valid UTF-8"):
        read_table(_spec(path))


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_pieces_over_the_held_share_are_sealed_then_gone(tmp_path, monkeypatch, ext):
    """Under a small budget most of the pieces go to the encrypted spill area, which is
    removed once they are written; the output is the same."""
    ours, theirs = _frames()
    a = _spec(_write(ours, tmp_path / f"a.{ext}"))
    b = _spec(_write(theirs, tmp_path / f"b.{ext}"))
    spill = tmp_path / "spill"
    spill.mkdir()
    with read_table(a, memory_budget=SMALL_BUDGET, spill_dir=spill) as mine, read_table(b) as other:
        hi, lo, _ = intersect_records([mine.key_records(SEEDS), other.key_records(SEEDS)])
        rows = find_matching_rows(mine, SEEDS, hi, lo)
    sealed: list[int] = []
    real = SpillArea.write

    def counting(self, payload, label):
        sealed.append(len(payload))
        return real(self, payload, label)

    monkeypatch.setattr(SpillArea, "write", counting)
    on_disk: list[bytes] = []
    real_read = SpillArea.read

    def reading(self, path, label):
        on_disk.append(path.read_bytes())  # what a host reading TMPDIR would see
        return real_read(self, path, label)

    monkeypatch.setattr(SpillArea, "read", reading)
    out = tmp_path / f"out.{ext}"
    write_rows(rows, a, out)
    assert len(sealed) > 10 and out.read_bytes() == _reference(tmp_path, ext)
    assert len(on_disk) == len(sealed)
    assert not any(
        b"@ex.com" in data or b"ARROW" in data or b"fairly long" in data for data in on_disk
    )
    assert list(spill.iterdir()) == []


@pytest.mark.parametrize("ext", ["csv", "parquet"])
@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_input_deleted_or_replaced_after_reading_still_gives_its_rows(tmp_path, ext, how):
    """The input is held open from the first read: the rows written (and rescued) are
    those of the file that was hashed, whatever happens to its name meanwhile."""
    rows, spec = _matching(tmp_path, ext)
    want = _reference(tmp_path, ext)
    if how == "deleted":
        spec.path.unlink()
    else:
        other = tmp_path / f"other.{ext}"
        _write(_frames()[1], other)
        other.rename(spec.path)
    out = tmp_path / f"out.{ext}"
    write_rows(rows, spec, out)
    assert len(rows) > 1000 and out.read_bytes() == want


def test_input_changed_in_place_is_refused_with_what_to_do(tmp_path):
    rows, spec = _matching(tmp_path, "parquet")
    with spec.path.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\0" * 8)
        handle.write(b"more")
        handle.seek(0, 2)
        handle.write(b"x")
    with pytest.raises(TableError, match="changed while this run read it; keep the input"):
        write_rows(rows, spec, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("budget", [REREAD_BUDGET, 1 << 30])
@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_keys_sharing_their_first_16_bytes_are_ordered_by_their_whole_key(tmp_path, ext, budget):
    """The order comes from the keys' 16-byte prefixes found at hashing; keys that share
    one are put in order by their whole bytes (read again when the rows are not held),
    then by input order."""
    rng = np.random.default_rng(5)
    ids = rng.integers(0, 3000, 6000)
    keys = [f"customer-identifier-{n:05d}@corp" if n % 3 else f"short{n % 7}" for n in ids]
    ours = pl.DataFrame({"email": keys, "n": [str(i) for i in range(len(keys))]})
    a = _spec(_write(ours, tmp_path / f"a.{ext}"))
    b = _spec(_write(pl.DataFrame({"email": keys[::2]}), tmp_path / f"b.{ext}"))
    with read_table(a, memory_budget=budget) as mine, read_table(b) as other:
        hi, lo, _ = intersect_records([mine.key_records(SEEDS), other.key_records(SEEDS)])
        got = matching_rows(mine, SEEDS, hi, lo)
    wanted = set(keys[::2])
    want = (
        ours.with_row_index("i")
        .filter(pl.col("email").is_in(list(wanted)))
        .sort(["email", "i"])
        .drop("i")
    )
    assert len(got) > 1000 and got.equals(want)


def test_rows_rescued_after_the_input_was_deleted(tmp_path, monkeypatch):
    """--output failed, and the input is gone by then: the rescue still has every row."""
    from teepsi.cli.party_files import rescue_rows

    rows, spec = _matching(tmp_path, "csv")
    want = _reference(tmp_path, "csv")
    spec.path.unlink()
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    rescued = rescue_rows(rows, spec, "job-1", "p1")
    assert rescued is not None and Path(rescued).read_bytes() == want
    assert Path(rescued).stat().st_mode & 0o777 == 0o600
