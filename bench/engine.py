#!/usr/bin/env python3
"""The server's engine alone: 2 x 5M random records (half in common), as the server sees them.

ingest = the upload chunks' wire payloads (256k records each) stored as the Upload handler
stores them; intersect = ``intersect_stores`` (the step after the last upload). Median of 5.
Runs against this checkout, or against an older one for comparison (its store took decoded
arrays, computed the set digests during the intersection and had no partitioner):

    python bench/engine.py
    PYTHONPATH=/path/to/old/checkout/src python bench/engine.py
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import numpy as np

from teepsi.engine import store as st
from teepsi.engine.intersect import as_u128, split_u128
from teepsi.engine.records import records_from_bytes, records_to_bytes
from teepsi.protocol.chunks import RECORDS_PER_CHUNK

try:  # since the result is merged into chunks (engine.result)
    from teepsi.engine.result import intersect_stores as merged_intersection
except ImportError:
    merged_intersection = None

N = 5_000_000
REPEAT = 5


def main() -> None:
    rng = np.random.default_rng(1)
    hi = rng.integers(0, 2**64, 2 * N, dtype=np.uint64)
    lo = rng.integers(0, 2**64, 2 * N, dtype=np.uint64)
    sets = [
        split_u128(as_u128(hi[:N], lo[:N]).sort()),
        split_u128(as_u128(hi[N // 2 : N // 2 + N], lo[N // 2 : N // 2 + N]).sort()),
    ]
    step = RECORDS_PER_CHUNK
    payloads = [
        [records_to_bytes(h[i : i + step], lo_[i : i + step]) for i in range(0, N, step)]
        for h, lo_ in sets
    ]
    keyed = "partitioner" in inspect.signature(st.RecordStore).parameters
    ingest, intersect, cpu = [], [], []
    for _ in range(REPEAT):
        budget = st.MemoryBudget(1 << 40)
        shared: dict[str, Any] = {"partitioner": st.Partitioner()} if keyed else {}
        stores = []
        started, started_cpu = time.perf_counter(), time.process_time()
        for party in payloads:
            store: Any = st.RecordStore(budget, None, **shared)
            for raw in party:
                if keyed:
                    store.add_records(raw)
                else:
                    store.add(*records_from_bytes(raw))
            store.finish()
            stores.append(store)
        stored = time.perf_counter()
        if merged_intersection is not None:
            found = merged_intersection(stores, spill=None, chunk_records=RECORDS_PER_CHUNK)
            size = len(found.result)
        elif keyed:
            found = st.intersect_stores(stores)  # type: ignore[attr-defined]
            size = len(found.hi)
        else:
            found = st.intersect_stores(stores, salts=[b"a", b"b"])  # type: ignore[attr-defined]
            size = len(found.hi)
        done, done_cpu = time.perf_counter(), time.process_time()
        assert size == N // 2
        for store in stores:
            store.close()
        ingest.append(stored - started)
        intersect.append(done - stored)
        cpu.append(done_cpu - started_cpu)
    print(
        f"{'keyed' if keyed else 'old'} split, 2 x {N:,} records: ingest "
        f"{statistics.median(ingest):.3f} s, intersect {statistics.median(intersect):.3f} s, "
        f"both {statistics.median([a + b for a, b in zip(ingest, intersect, strict=True)]):.3f} s "
        f"(CPU {statistics.median(cpu):.3f} s), medians of {REPEAT}"
    )


if __name__ == "__main__":
    main()
