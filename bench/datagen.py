"""Seeded benchmark data: e-mail-like keys, one file per party and format.

Formats (what users run): ``txt``, one key per line (the seed's format); ``csv`` and
``parquet``, five columns (``email``, the key, then amount, name, date, country).

Layout for ``rows`` per party (``q = rows // 4``), by id block:

    [0, q)            all three parties          (the 3-party intersection)
    [q, 2q)           parties 1 and 2
    [2q, 3q)          parties 1 and 3
    [3q, 4q)          parties 2 and 3
    [4q + i*r, ...)   party i alone, r = rows - 3q rows each

So every pair shares ``2q = rows / 2`` keys (50% overlap), the 3-party intersection is
``q`` keys, and the 2-party configuration simply uses parties 1 and 2 of the same files
(intersection ``2q``). Row order is shuffled (seeded) so nothing arrives pre-sorted.

Run as a script so the orchestrator's own memory stays small (its RSS would otherwise
inflate children's ``ru_maxrss`` via vfork; see run.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq

#: Bump when the layout or the columns change: cached files are keyed by it.
LAYOUT_VERSION = 2
FORMATS = ("txt", "csv", "parquet")
#: Rows generated and written at once: keeps a 100M-row party within a few GiB.
CHUNK_ROWS = 5_000_000
KEY_COLUMN = "email"
PARTIES = 3
_FIRST_NAMES = [
    "Alice",
    "Bob",
    "Carol",
    "Dave",
    "Erin",
    "Frank",
    "Grace",
    "Heidi",
    "Ivan",
    "Judy",
    "Mallory",
    "Niaj",
    "Olivia",
    "Peggy",
    "Rupert",
    "Sybil",
    "Trent",
    "Uma",
    "Victor",
    "Wendy",
]
_COUNTRIES = ["CH", "DE", "FR", "IT", "NL", "SE", "UK", "US"]


def party_ids(party: int, rows: int) -> np.ndarray:
    """Ids held by ``party`` (0-based) under the layout above, unshuffled."""
    q = rows // 4
    only = rows - 3 * q
    blocks = {
        0: [(q, 2 * q), (2 * q, 3 * q)],
        1: [(q, 2 * q), (3 * q, 4 * q)],
        2: [(2 * q, 3 * q), (3 * q, 4 * q)],
    }[party]
    own_start = 4 * q + party * only
    ranges = [(0, q), *blocks, (own_start, own_start + only)]
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])


def expected_intersection(rows: int, parties: int) -> int:
    q = rows // 4
    return 2 * q if parties == 2 else q


def dataset_dir(root: Path, rows: int, seed: int) -> Path:
    return root / f"v{LAYOUT_VERSION}-rows{rows}-seed{seed}"


def party_file(directory: Path, party: int, fmt: str) -> Path:
    return directory / f"party{party + 1}.{fmt}"


def make_frame(ids: np.ndarray, rng: np.random.Generator) -> pl.DataFrame:
    """The five columns for ``ids`` (already in file order)."""
    n = len(ids)
    frame = pl.DataFrame(
        {
            "id": ids,
            "amount": np.round(rng.uniform(1.0, 5000.0, n), 2),
            "first": rng.integers(0, len(_FIRST_NAMES), n, dtype=np.int64),
            "days": rng.integers(0, 3650, n, dtype=np.int64),
            "country": rng.integers(0, len(_COUNTRIES), n, dtype=np.int64),
        }
    )
    return frame.select(
        pl.concat_str(
            pl.lit("user"),
            pl.col("id").cast(pl.String),
            pl.lit("@example"),
            (pl.col("id") % 97).cast(pl.String),
            pl.lit(".com"),
        ).alias(KEY_COLUMN),
        pl.col("amount").cast(pl.String),  # text as written: keeps float formatting stable
        (
            pl.col("first").replace_strict(list(range(len(_FIRST_NAMES))), _FIRST_NAMES)
            + pl.lit(" ")
            + pl.lit("Tester")
        ).alias("name"),
        (pl.date(2015, 1, 1) + pl.duration(days=pl.col("days"))).cast(pl.String).alias("date"),
        pl.col("country").replace_strict(list(range(len(_COUNTRIES))), _COUNTRIES),
    )


class _PartyWriter:
    """Appends chunks of one party's rows to its file in one format."""

    def __init__(self, target: Path, fmt: str) -> None:
        self.fmt = fmt
        self.partial = target.with_suffix(target.suffix + ".partial")
        self.target = target
        self._handle = None if fmt == "parquet" else open(self.partial, "wb")  # noqa: SIM115 closed in close()
        self._parquet: pq.ParquetWriter | None = None
        self._first = True

    def write(self, frame: pl.DataFrame) -> None:
        if self.fmt == "txt":
            assert self._handle is not None
            # Keys hold no separator or quote: one key per line, as written.
            frame.select(KEY_COLUMN).write_csv(self._handle, include_header=False)
        elif self.fmt == "csv":
            assert self._handle is not None
            frame.write_csv(self._handle, include_header=self._first)
        else:
            table = frame.to_arrow()
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.partial, table.schema)
            self._parquet.write_table(table)
        self._first = False

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        if self._parquet is not None:
            self._parquet.close()
        self.partial.rename(self.target)  # a killed run never leaves a truncated cached file


def generate(
    root: Path, rows: int, seed: int, formats: list[str], parties: int = PARTIES
) -> dict[str, object]:
    """Write (or reuse) the first ``parties`` party files; returns a manifest."""
    directory = dataset_dir(root, rows, seed)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise SystemExit(f"--formats {','.join(unknown)}: use {', '.join(FORMATS)}")
    manifest_path = directory / "manifest.json"
    wanted = {fmt: [str(party_file(directory, p, fmt)) for p in range(parties)] for fmt in formats}
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if all(Path(f).exists() for files in wanted.values() for f in files):
            manifest["cached"] = True
            return dict(manifest)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for party in range(parties):
        # One generator per party: the files do not depend on which formats were asked for.
        rng = np.random.default_rng([seed, party])
        ids = rng.permutation(party_ids(party, rows))  # shuffled: nothing arrives sorted
        writers = [
            _PartyWriter(party_file(directory, party, fmt), fmt)
            for fmt in formats
            if not party_file(directory, party, fmt).exists()
        ]
        if not writers:
            continue
        for start in range(0, rows, CHUNK_ROWS):
            frame = make_frame(ids[start : start + CHUNK_ROWS], rng)
            for writer in writers:
                writer.write(frame)
        for writer in writers:
            writer.close()
    manifest = {
        "layout_version": LAYOUT_VERSION,
        "rows": rows,
        "seed": seed,
        "key": KEY_COLUMN,
        "files": {
            fmt: [
                str(party_file(directory, p, fmt))
                for p in range(PARTIES)
                if party_file(directory, p, fmt).exists()
            ]
            for fmt in FORMATS
            if party_file(directory, 0, fmt).exists()
        },
        "intersection": {str(n): expected_intersection(rows, n) for n in (2, 3)},
        "generated_seconds": round(time.monotonic() - started, 2),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2))
    manifest["cached"] = False
    return manifest


def openmined_sample(directory: Path, rows: int, sample: int, out: Path) -> dict[str, int]:
    """Two key lists from parties 1 and 2 with the same 50% overlap, ``sample`` keys each.

    Taken from the generated CSV files themselves (the same keys teepsi matched): half of
    each list is keys both parties hold, the other half keys only that party holds.
    """
    a = pl.read_csv(party_file(directory, 0, "csv"), columns=[KEY_COLUMN], infer_schema=False)
    b = pl.read_csv(party_file(directory, 1, "csv"), columns=[KEY_COLUMN], infer_schema=False)
    common = a.join(b, on=KEY_COLUMN, how="semi")
    a_only = a.join(b, on=KEY_COLUMN, how="anti")
    b_only = b.join(a, on=KEY_COLUMN, how="anti")
    half = sample // 2
    if min(len(common), len(a_only), len(b_only)) < sample - half:
        raise SystemExit(f"dataset of {rows} rows is too small for a {sample}-key sample")
    both = common.sample(half, seed=1)
    server = pl.concat([both, a_only.sample(sample - half, seed=2)])
    client = pl.concat([both, b_only.sample(sample - half, seed=3)])
    out.mkdir(parents=True, exist_ok=True)
    server.write_csv(out / "server_keys.txt", include_header=False)
    client.write_csv(out / "client_keys.txt", include_header=False)
    return {"server": len(server), "client": len(client), "intersection": half}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--formats", default="csv")
    parser.add_argument(
        "--parties", type=int, default=PARTIES, help="write only the first N parties' files"
    )
    parser.add_argument("--openmined-sample", type=int, default=0)
    parser.add_argument("--openmined-out", type=Path)
    args = parser.parse_args()
    if not 2 <= args.parties <= PARTIES:
        parser.error(f"--parties {args.parties}: between 2 and {PARTIES}")
    manifest = generate(args.root, args.rows, args.seed, args.formats.split(","), args.parties)
    if args.openmined_sample:
        assert args.openmined_out is not None
        manifest["openmined_sample"] = openmined_sample(
            dataset_dir(args.root, args.rows, args.seed),
            args.rows,
            args.openmined_sample,
            args.openmined_out,
        )
    sys.stdout.write(json.dumps(manifest) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
