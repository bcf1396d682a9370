"""Shared pieces of the fuzz harnesses (not a harness itself).

* :func:`with_defaults` adds the harness's defaults (input size cap, a 30 s per-input
  timeout, dictionary from ``fuzz/dicts/``) to libFuzzer's command line unless it sets
  them itself.
* :func:`amplifying_mutator`: libFuzzer's own mutations, plus, one time in ten, a short
  slice of the input repeated hundreds or thousands of times. libFuzzer grows inputs a
  few bytes at a time, so on its own it hardly ever writes the 5,000-digit number or the
  1,000-deep nesting that break parsers built on ``json``, ``tomllib`` or ``int()``.
* :func:`guard`: with ``TEEPSI_FUZZ_TOLERATE_KNOWN=1`` in the environment, crashes that
  match a known, reported and not yet fixed issue (:data:`KNOWN_ISSUES`, each with a
  strict-xfail regression test in tests/unit/test_fuzz_regressions.py) are counted and
  skipped instead of stopping the run, so that the fuzzer can look for *other* bugs; the
  first input hitting each is saved next to libFuzzer's own crash files
  (``-artifact_prefix``) as ``known-<key>-<sha1>``.
  Without the variable every crash stops the run, as libFuzzer does by default.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import atheris

FUZZ_DIR = Path(__file__).resolve().parent
TOLERATE_ENV = "TEEPSI_FUZZ_TOLERATE_KNOWN"

TestOneInput = Callable[[bytes], None]


@dataclass(frozen=True)
class KnownIssue:
    """A crash already reported: its exception type and the innermost teepsi frame."""

    key: str
    exception: type[BaseException]
    file: str  # path suffix below src/, e.g. "teepsi/contract/spec.py"
    function: str
    summary: str

    def matches(self, exc: BaseException) -> bool:
        if not isinstance(exc, self.exception):
            return False
        frames = [
            frame
            for frame in traceback.extract_tb(exc.__traceback__)
            if "/teepsi/" in frame.filename.replace(os.sep, "/")
        ]
        if not frames:
            return False
        innermost = frames[-1]
        return (
            innermost.filename.replace(os.sep, "/").endswith("/" + self.file)
            and innermost.name == self.function
        )


#: Reported crashes, keyed as in docs/fuzzing.md. Remove an entry once src/ is fixed
#: (its strict-xfail regression test then starts failing, as a reminder).
KNOWN_ISSUES: tuple[KnownIssue, ...] = ()

_tolerated: dict[str, int] = {}


def known_issue(exc: BaseException) -> KnownIssue | None:
    return next((issue for issue in KNOWN_ISSUES if issue.matches(exc)), None)


def _save_reproducer(issue: KnownIssue, data: bytes) -> None:
    """Keep the first input that hits ``issue``, as ``<artifact_prefix>known-<key>-<sha1>``.

    Nothing is written when the prefix already holds a reproducer of the issue.
    """
    prefix = next(
        (arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("-artifact_prefix=")),
        None,
    )
    if prefix is None:
        return
    directory, stem = os.path.split(prefix)  # "-artifact_prefix=dir/" gives stem ""
    if list(Path(directory or ".").glob(f"{stem}known-{issue.key}-*")):
        return  # one reproducer per issue and directory is enough
    path = Path(f"{prefix}known-{issue.key}-{hashlib.sha1(data).hexdigest()}")  # noqa: S324
    try:
        path.write_bytes(data)
    except OSError as exc:
        print(f"cannot save reproducer of {issue.key}: {exc}", file=sys.stderr)
        return
    print(f"TOLERATED known issue {issue.key}: first input saved to {path}", file=sys.stderr)


def guard(test_one_input: TestOneInput) -> TestOneInput:
    """``test_one_input``, skipping known issues when TEEPSI_FUZZ_TOLERATE_KNOWN=1."""
    if os.environ.get(TOLERATE_ENV) != "1":
        return test_one_input

    def guarded(data: bytes) -> None:
        try:
            test_one_input(data)
        except Exception as exc:
            issue = known_issue(exc)
            if issue is None:
                raise
            count = _tolerated[issue.key] = _tolerated.get(issue.key, 0) + 1
            if count == 1:
                _save_reproducer(issue, data)
            if count & (count - 1) == 0:  # 1, 2, 4, 8, ...: visible, but not flooding
                print(
                    f"TOLERATED known issue {issue.key} ({count}x): {issue.summary}",
                    file=sys.stderr,
                )

    return guarded


def amplifying_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if data and rng.random() < 0.1:
        start = rng.randrange(len(data))
        piece = data[start : start + rng.randint(1, 8)]
        times = rng.choice((64, 256, 1024, 4096))
        amplified = data[:start] + piece * times + data[start:]
        return amplified[:max_size]
    return atheris.Mutate(data, max_size)


def with_defaults(argv: list[str], name: str, *, max_len: int) -> list[str]:
    """``argv`` plus ``-max_len``, ``-timeout=30`` and ``-dict=fuzz/dicts/<name>.dict``.

    Each only when the command line does not set it.
    """
    argv = list(argv)
    given = {arg.split("=", 1)[0] for arg in argv[1:] if arg.startswith("-")}
    if "-max_len" not in given:
        argv.append(f"-max_len={max_len}")
    if "-timeout" not in given:  # libFuzzer's default is 20 minutes per input
        argv.append("-timeout=30")
    dictionary = FUZZ_DIR / "dicts" / f"{name}.dict"
    if "-dict" not in given and dictionary.is_file():
        argv.append(f"-dict={dictionary}")
    return argv
