"""What a data provider's input is: its format, key columns and normalisation, and the
error for input that cannot be read as asked."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from teepsi.contract.normalization import Normalization
from teepsi.engine.records import key_scheme_id
from teepsi.errors import TeepsiError

#: The one column of a text table (and of its output).
TEXT_COLUMN = "item"


class TableError(TeepsiError, ValueError):
    """Input that cannot be read as asked; one line naming the file and the problem."""


class TableFormat(StrEnum):
    TEXT = "text"
    CSV = "csv"
    PARQUET = "parquet"


_EXTENSIONS = {
    ".csv": TableFormat.CSV,
    ".tsv": TableFormat.CSV,
    ".parquet": TableFormat.PARQUET,
    ".pq": TableFormat.PARQUET,
}
#: Compression suffixes recognised, so a compressed file is never read as text.
COMPRESSED_SUFFIXES = frozenset({".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4"})


def detect_format(path: str | Path, explicit: str | None = None) -> TableFormat:
    """The format named by ``explicit``, else by the file extension (text by default)."""
    if explicit:
        try:
            return TableFormat(explicit)
        except ValueError:
            raise TableError(f"the table format {explicit!r}: use text, csv or parquet") from None
    suffixes = [x.lower() for x in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSED_SUFFIXES:
        inner = suffixes[-2] if len(suffixes) > 1 else ""
        if suffixes[-1] == ".gz" and _EXTENSIONS.get(inner) is TableFormat.CSV:
            return TableFormat.CSV  # polars reads gzip CSV itself
        raise TableError(
            f"{path}: a {suffixes[-1]}-compressed file is read only as gzip CSV (.csv.gz, "
            ".tsv.gz): decompress it first, or name it .csv.gz if it is gzip CSV"
        )
    return _EXTENSIONS.get(suffixes[-1] if suffixes else "", TableFormat.TEXT)


def is_compressed(path: Path) -> bool:
    return path.suffix.lower() in COMPRESSED_SUFFIXES


@dataclass(frozen=True)
class TableSpec:
    """How to read one party's input, and so how to write its output."""

    path: Path
    format: TableFormat = TableFormat.TEXT
    key_columns: tuple[str, ...] = ()
    delimiter: str = ","
    quote_char: str | None = '"'
    normalization: Normalization = field(default_factory=Normalization)

    @property
    def arity(self) -> int:
        return 1 if self.format is TableFormat.TEXT else len(self.key_columns)

    @property
    def key_scheme(self) -> str:
        return key_scheme_id(self.normalization, self.arity)
