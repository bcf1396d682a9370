"""The in-process reference: what a user would write with no privacy at all.

One Python process reads every party's table with polars, takes each party's unique keys,
semi-joins them down to the intersection and writes each party's matching rows ordered by
key: the same outputs teepsi produces. Columns are read as text (``infer_schema=False``),
as teepsi does, so the outputs can be compared byte for byte.

Usage: reference.py KEY OUT_DIR FILE... (one file per party; CSV or Parquet by extension).
Prints one JSON line with the intersection size and the output paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl


def read(path: Path) -> pl.DataFrame:
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    return pl.read_csv(path, infer_schema=False)


def main(argv: list[str]) -> int:
    key, out_dir, *files = argv
    tables = [read(Path(f)) for f in files]
    common = tables[0].select(key).unique()
    for table in tables[1:]:
        common = common.join(table.select(key).unique(), on=key, how="semi")
    outputs = []
    for index, (path, table) in enumerate(zip(files, tables, strict=True), start=1):
        rows = table.join(common, on=key, how="semi").sort(key, maintain_order=True)
        target = Path(out_dir) / f"ref_{index}{Path(path).suffix}"
        if target.suffix == ".parquet":
            rows.write_parquet(target)
        else:
            rows.write_csv(target)
        outputs.append(str(target))
    sys.stdout.write(json.dumps({"intersection": len(common), "outputs": outputs}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
