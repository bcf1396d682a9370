"""Reading inputs (text, CSV, Parquet), normalising keys, writing matching rows."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from teepsi.contract.normalization import Normalization, NormalizationError
from teepsi.engine.intersect import intersect_records
from teepsi.engine.key_order import key_order
from teepsi.engine.matching import matching_rows
from teepsi.engine.records import hash_keys, key_scheme_id, normalized_expr
from teepsi.engine.tables import (
    TableError,
    TableFormat,
    TableSpec,
    detect_format,
    read_table,
    text_lines,
    write_rows,
)

SEEDS = (123, 456)


def _text(tmp_path: Path, data: bytes, **kw) -> TableSpec:
    path = tmp_path / "items.txt"
    path.write_bytes(data)
    return TableSpec(path=path, **kw)


def test_key_records_are_standard_xxh3():
    """Parties on different builds agree: the digests are XXH3-64 as specified."""
    hi, lo = hash_keys(pl.Series(["alice@example.org", "é"]), SEEDS)
    assert int(hi[0]) == xxhash.xxh3_64_intdigest(b"alice@example.org", seed=SEEDS[0])
    assert int(lo[1]) == xxhash.xxh3_64_intdigest("é".encode(), seed=SEEDS[1])


def test_text_items_are_stripped_lines(tmp_path):
    # Without key normalisation the keys are the items exactly as read.
    table = read_table(
        _text(tmp_path, b'a\r\n  b \n\n\t\nc,d\n"q"\n', normalization=Normalization(trim=False))
    )
    assert table.keys().to_list() == ["a", "b", "c,d", '"q"']
    assert table.rows_read == 4


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"ok\n\xff\xfe\n", "line 2: not valid UTF-8"),
        (b"ok\nbad\0item\n", "line 2: contains a NUL byte"),
        (b"x" * (64 * 1024 + 1) + b"\n", "exceeds the limit"),
    ],
)
def test_bad_text_refused_with_one_line(tmp_path, data, needle):
    with pytest.raises(TableError) as err:
        read_table(_text(tmp_path, data))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_empty_text_file_is_an_empty_set(tmp_path):
    assert read_table(_text(tmp_path, b"")).rows_read == 0
    assert read_table(_text(tmp_path, b"\n \r\n")).rows_read == 0


def test_missing_file(tmp_path):
    with pytest.raises(TableError, match="no such file"):
        read_table(TableSpec(path=tmp_path / "nope.txt"))


def test_formats_by_extension():
    assert detect_format("a.csv") is TableFormat.CSV
    assert detect_format("a.TSV") is TableFormat.CSV
    assert detect_format("a.parquet") is TableFormat.PARQUET
    assert detect_format("data1.txt") is TableFormat.TEXT
    assert detect_format("a.csv", "parquet") is TableFormat.PARQUET
    with pytest.raises(TableError):
        detect_format("a", "xlsx")


def test_normalisation_options():
    assert Normalization.parse("trim").canonical() == "trim"
    assert Normalization.parse("nfc, casefold,trim").canonical() == "trim,casefold,nfc"
    assert Normalization.parse("none").canonical() == "none"
    with pytest.raises(NormalizationError, match="lowercase"):
        Normalization.parse("trim,lowercase")
    frame = pl.DataFrame({"k": ["  Café ", "cafe\u0301", "CAFÉ"]})
    norm = Normalization(trim=True, casefold=True, nfc=True)
    assert frame.select(normalized_expr(norm, pl.col("k")))["k"].to_list() == ["café"] * 3
    assert key_scheme_id(norm, 2) == "xxh3-64x2-v1;normalize=trim,casefold,nfc;columns=2"


def _csv(tmp_path: Path, name: str, text: str, keys: tuple[str, ...], **kw) -> TableSpec:
    path = tmp_path / name
    path.write_text(text)
    return TableSpec(path=path, format=TableFormat.CSV, key_columns=keys, **kw)


def _run(tables):
    """What the server and each client compute, in-process."""
    records = [t.key_records(SEEDS) for t in tables]
    hi, lo, _ = intersect_records(records)
    return [matching_rows(t, SEEDS, hi, lo) for t in tables]


def test_csv_composite_keys_and_repeated_keys(tmp_path):
    a = read_table(
        _csv(
            tmp_path,
            "a.csv",
            "first,last,amount\nAda,Lovelace,1\nAda,Lovelace,2\nAlan,Turing,3\nab,c,4\n",
            ("first", "last"),
        )
    )
    b = read_table(
        _csv(
            tmp_path,
            "b.csv",
            "last;first;note\nLovelace;Ada;x\nTuring;Grace;y\na;bc;z\n",
            ("first", "last"),
            delimiter=";",
        )
    )
    rows_a, rows_b = _run([a, b])
    # Semi-join: the repeated key matches once but returns both its rows; columns kept.
    assert rows_a.to_dicts() == [
        {"first": "Ada", "last": "Lovelace", "amount": "1"},
        {"first": "Ada", "last": "Lovelace", "amount": "2"},
    ]
    assert rows_b["note"].to_list() == ["x"]  # ("ab","c") never matches ("a","bc")


def test_csv_rows_ordered_by_key_and_written_in_format(tmp_path):
    spec = _csv(tmp_path, "a.csv", "id,k\n1,zebra\n2,apple\n3,mango\n4,apple\n", ("k",))
    other = _csv(tmp_path, "b.csv", "k\napple\nzebra\n", ("k",))
    rows, _ = _run([read_table(spec), read_table(other)])
    assert rows["id"].to_list() == ["2", "4", "1"]
    out = tmp_path / "out.csv"
    write_rows(rows, spec, out)
    assert out.read_text() == "id,k\n2,apple\n4,apple\n1,zebra\n"


def test_parquet_in_parquet_out(tmp_path):
    path = tmp_path / "a.parquet"
    pl.DataFrame({"email": ["x@y", "a@b", None, ""], "n": [1, 2, 3, 4]}).write_parquet(path)
    spec = TableSpec(path=path, format=TableFormat.PARQUET, key_columns=("email",))
    table = read_table(spec)
    assert table.rows_read == 4 and table.rows_with_key == 2  # null and empty keys never match
    other = _csv(tmp_path, "b.csv", "email\na@b\nx@y\n", ("email",))
    rows, _ = _run([table, read_table(other)])
    out = tmp_path / "out.parquet"
    write_rows(rows, spec, out)
    back = pl.read_parquet(out)
    assert back.to_dicts() == [{"email": "a@b", "n": 2}, {"email": "x@y", "n": 1}]


def test_missing_key_column_named(tmp_path):
    with pytest.raises(TableError, match=r"no column 'mail'.*email"):
        read_table(_csv(tmp_path, "a.csv", "email\nx\n", ("mail",)))
    # The library's words; the CLI asks for --key-column before it reads (party_files).
    with pytest.raises(TableError, match=r"a\.csv: name the key column\(s\)$"):
        read_table(_csv(tmp_path, "a.csv", "email\nx\n", ()))


def test_text_output_is_distinct_normalised_items_bytewise(tmp_path):
    norm = Normalization(trim=True, casefold=True)
    a = read_table(_text(tmp_path, "Zed\nzed\nApple\néclair\n".encode(), normalization=norm))
    other = tmp_path / "b.txt"
    other.write_text("ZED\nappLE\nÉCLAIR\nx\n")
    b = read_table(TableSpec(path=other, normalization=norm))
    rows_a, rows_b = _run([a, b])
    assert text_lines(rows_a) == text_lines(rows_b) == "apple\nzed\néclair\n".encode()


def _polars_order(keys: list[str]) -> list[int]:
    frame = pl.Series(keys, dtype=pl.String).to_frame("k").with_row_index("i")
    return frame.sort(["k", "i"])["i"].to_list()


@pytest.mark.parametrize(
    "keys",
    [
        ["b", "a", "c", "a", "ab", "a"],  # repeats: stable within a key
        ["user2@x.com", "user10@x.com", "user1@x.com"],
        ["é", "e", "z", "ä", "e\u0301", "\U0001f600"],  # multi-byte UTF-8
        ["a\x00", "a", "a\x00b", "", "a\x00\x00"],  # NUL bytes: equal words, length decides
        ["x" * 16, "x" * 15 + "y", "x" * 17, "x" * 8],  # across word boundaries
        ["a" * 128, "b", "a", "a" * 127],  # 16 words, the most sorted as words
        ["a" * 300, "b", "a", "a" * 299],  # long keys sharing a prefix: ties sorted as strings
        ["p" * 20 + "b", "q", "p" * 20 + "a", "p" * 16, "p" * 15, "p" * 20 + "b"],  # ties mixed in
        ["only"],
        [],
    ],
)
def test_key_order_is_polars_bytewise_stable_order(keys):
    order = key_order(pl.Series(keys, dtype=pl.String))
    assert order.tolist() == _polars_order(keys)


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=6), max_size=60))
@settings(max_examples=200, deadline=None)
def test_key_order_matches_polars_on_any_strings(keys):
    series = pl.Series(keys, dtype=pl.String)
    assert key_order(series).tolist() == _polars_order(keys)


@given(st.lists(st.text(alphabet="ab\x00\u00e9\uffff", max_size=40), max_size=60))
@settings(max_examples=200, deadline=None)
def test_key_order_matches_polars_on_long_keys_sharing_prefixes(keys):
    assert key_order(pl.Series(keys, dtype=pl.String)).tolist() == _polars_order(keys)


def test_matching_rows_of_a_large_ascii_table_are_key_ordered(tmp_path):
    """The numpy path at a size where it is taken, repeats included, against polars."""
    import numpy as np

    rng = np.random.default_rng(7)
    emails = [f"user{n}@example{n % 97}.com" for n in rng.integers(0, 30_000, 20_000)]
    path = tmp_path / "a.csv"
    pl.DataFrame({"email": emails, "row": [str(i) for i in range(len(emails))]}).write_csv(path)
    spec = TableSpec(path=path, format=TableFormat.CSV, key_columns=("email",))
    other = tmp_path / "b.csv"
    pl.DataFrame({"email": emails[::3]}).write_csv(other)
    rows, _ = _run([read_table(spec), read_table(TableSpec(other, TableFormat.CSV, ("email",)))])
    wanted = set(emails[::3])
    expected = (
        pl.read_csv(path, infer_schema=False)
        .filter(pl.col("email").is_in(list(wanted)))
        .with_row_index("i")
        .sort(["email", "i"])
        .drop("i")
    )
    assert rows.equals(expected)
