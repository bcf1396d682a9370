"""The acceptance checks: what a benchmark run must show, each a PASS, FAIL or SKIP line.

Judged at the acceptance size (10M rows per party, or the largest size run, with a note
saying so): outputs identical to every reference's, speed against the fastest reference,
memory of every process, the spill run, and for make bench-huge its own limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from bench_common import GIB, MIB, Json, fmt_bytes, fmt_rows, median_run

#: The acceptance size: the issue's targets are set at 10M rows per party.
TARGET_ROWS = 10_000_000


def fastest_reference(config: Json) -> Json | None:
    """The median run of the fastest in-process reference: the ratio that counts."""
    medians = [median_run(runs) for runs in config["references"].values() if runs]
    return min(medians, key=lambda r: r["wall_s"]) if medians else None


@dataclass
class Check:
    name: str
    passed: bool | None
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{verdict}  {self.name}: {self.detail}"


def _at_target(configs: dict[tuple[int, int, str], Json], sizes: list[int]) -> tuple[int, str]:
    """The size the targets are judged at: 10M, or the largest run with a note saying so."""
    if TARGET_ROWS in sizes:
        return TARGET_ROWS, ""
    big = max(sizes)
    return big, f" [at {fmt_rows(big)}: not the acceptance size {fmt_rows(TARGET_ROWS)}]"


def output_checks(results: Json) -> list[Check]:
    """Every configuration's outputs against every reference's (Parquet: by content)."""
    checks = []
    for c in results["configs"]:
        t = median_run(c["teepsi"])
        for engine, runs in c["references"].items():
            # Every repetition, not only the median: each must be right.
            different = [
                i for i, (ours, ref) in enumerate(zip(c["teepsi"], runs, strict=True))
                if ours["output_digests"] != ref["output_digests"]
            ]  # fmt: skip
            how = "by content" if c["format"] == "parquet" else "byte for byte"
            checks.append(
                Check(
                    f"{c['label']} outputs identical to {engine}'s, {how}",
                    not different,
                    "identical" if not different else f"DIFFERENT in runs {different}",
                )
            )
        expected = c["expected_intersection"]
        checks.append(
            Check(
                f"{c['label']} intersection is the generated one",
                t["intersection"] == expected,
                f"{t['intersection']} (expected {expected:,})",
            )
        )
    return checks


def speed_and_memory_checks(results: Json) -> list[Check]:
    configs = {(c["rows"], c["parties"], c["format"]): c for c in results["configs"]}
    sizes = sorted({c["rows"] for c in results["configs"]})
    rows, note = _at_target(configs, sizes)
    at = fmt_rows(rows)
    checks: list[Check] = []
    for fmt in ("txt", "csv"):
        name = f"2x{at} {fmt} wall ≤ 1.5x the fastest reference"
        c = configs.get((rows, 2, fmt))
        fastest = fastest_reference(c) if c is not None else None
        if c is None or fastest is None:
            checks.append(Check(name, None, "not run"))
        else:
            t = median_run(c["teepsi"])
            ratio = t["wall_s"] / fastest["wall_s"]
            checks.append(
                Check(
                    name,
                    ratio <= 1.5,
                    f"{t['wall_s']:.2f} s vs {fastest['engine']} {fastest['wall_s']:.2f} s "
                    f"= {ratio:.2f}x{note}",
                )
            )
    for fmt in ("txt", "csv"):
        runs = [configs[k] for k in configs if k[0] == rows and k[2] == fmt]
        if not runs:
            continue
        peaks = [b for c in runs for b in median_run(c["teepsi"])["client_peak_rss"]]
        counts = "/".join(str(c["parties"]) for c in runs)
        checks.append(
            Check(
                f"data provider peak RSS at {at} {fmt} ≤ 1 GiB",
                max(peaks) <= GIB,
                f"largest of {len(peaks)} data providers ({counts} parties): "
                f"{fmt_bytes(max(peaks))}{note}",
            )
        )
    servers = [
        (fmt, median_run(c["teepsi"])["server_peak_rss"])
        for (r, p, fmt), c in configs.items()
        if r == rows and p == 2
    ]
    if servers:
        worst = max(peak for _, peak in servers)
        checks.append(
            Check(
                f"server peak RSS at 2x{at} ≤ 1 GiB (default budget)",
                worst <= GIB,
                ", ".join(f"{fmt} {fmt_bytes(peak)}" for fmt, peak in servers) + note,
            )
        )
    om = results.get("openmined") or {}
    one_m = configs.get((1_000_000, 2, "txt")) or configs.get((1_000_000, 2, "csv"))
    if one_m is not None and om.get("scaled_seconds"):
        t = median_run(one_m["teepsi"])
        speedup = om["scaled_seconds"] / t["wall_s"]
        checks.append(
            Check(
                "1Mx1M ≥ 200x faster than openmined-psi",
                speedup >= 200,
                f"openmined {om['scaled_seconds']:.0f} s (sampled at "
                f"{om['server_items'] // 1000}k, scaled linearly) vs teepsi {one_m['label']} "
                f"{t['wall_s']:.2f} s = {speedup:.0f}x",
            )
        )
    elif not results.get("huge"):
        reason = om.get("error", "not run") if one_m is not None else "no 2x1M configuration"
        checks.append(Check("1Mx1M ≥ 200x faster than openmined-psi", None, reason))
    for fmt in sorted({k[2] for k in configs}):
        if not ((rows, 2, fmt) in configs and (rows, 3, fmt) in configs):
            checks.append(
                Check(f"3 parties ≤ 1.3x 2 parties at {at} {fmt}", None, "not run at both")
            )
        else:
            w2 = median_run(configs[(rows, 2, fmt)]["teepsi"])["wall_s"]
            w3 = median_run(configs[(rows, 3, fmt)]["teepsi"])["wall_s"]
            checks.append(
                Check(
                    f"3 parties ≤ 1.3x 2 parties at {at} {fmt}",
                    w3 / w2 <= 1.3,
                    f"{w3:.2f} s vs {w2:.2f} s = {w3 / w2:.2f}x{note}",
                )
            )
    return checks


def huge_checks(results: Json) -> list[Check]:
    """make bench-huge: every job completed, each data provider under 2 GiB, server in budget."""
    checks = []
    budget = 1 * GIB  # the server's default --memory-budget, which bench-huge does not change
    for c in results["configs"]:
        t = median_run(c["teepsi"])
        clients = max(t["client_peak_rss"])
        checks.append(
            Check(
                f"{c['label']}: every data provider under 2 GiB",
                clients < 2 * GIB,
                " / ".join(fmt_bytes(b) for b in t["client_peak_rss"]),
            )
        )
        checks.append(
            Check(
                f"{c['label']}: server peak RSS within its 1 GiB budget",
                t["server_peak_rss"] <= budget,
                fmt_bytes(t["server_peak_rss"]) + (" (spilled)" if t["spilled"] else ""),
            )
        )
    return checks


def budget_checks(budget: Json) -> list[Check]:
    t = budget["teepsi"]
    identical = t["output_digests"] == budget["default_output_digests"]
    limit = budget["server_rss_limit"]
    checks = [
        Check(
            f"--memory-budget {budget['budget_text']} at 2x{fmt_rows(budget['rows'])}: "
            "identical output",
            identical,
            ("identical to the default run" if identical else "DIFFERENT")
            + (" (spilled)" if t["spilled"] else " (NO SPILL happened)"),
        ),
        Check(
            f"--memory-budget {budget['budget_text']}: server peak RSS ≤ {fmt_bytes(limit)}",
            t["server_peak_rss"] <= limit,
            f"{fmt_bytes(t['server_peak_rss'])}{budget['note']}",
        ),
    ]
    spill = t.get("spill")
    if spill is not None:
        on_disk_clean = not spill["plaintext_hits"] and not spill["structured_files"]
        emptied = not spill["files_left_after_job"] and not spill["dirs_left_after_server_stop"]
        checks.append(
            Check(
                f"--memory-budget {budget['budget_text']}: no plaintext on disk, spill dir emptied",
                on_disk_clean and emptied and t["spilled"],
                f"{spill['files_seen']} spill files ({spill['bytes_scanned'] / MIB:.0f} MiB) "
                f"scanned for {spill['sample_keys']} sample keys and record structure: "
                f"{len(spill['plaintext_hits'])} with a key, "
                f"{len(spill['structured_files'])} non-random; files left after the job: "
                f"{len(spill['files_left_after_job'] or [])}, "
                f"after server stop: {len(spill['dirs_left_after_server_stop'])} dirs",
            )
        )
    return checks


def completion_check(results: Json) -> Check:
    failed = results.get("failed") or []
    return Check(
        "every configuration completed",
        not failed,
        "; ".join(f"{f['label']}: {f['error'][:300]}" for f in failed)
        or f"{len(results['configs'])} configurations",
    )


def acceptance(results: Json) -> list[Check]:
    checks = [completion_check(results), *output_checks(results)]
    if results.get("huge"):
        return checks + huge_checks(results)
    checks += speed_and_memory_checks(results)
    if results.get("budget"):
        checks += budget_checks(results["budget"])
    return checks
