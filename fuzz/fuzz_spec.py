#!/usr/bin/env python3
"""Fuzz job spec parsing.

Targets, on every input:

* :meth:`JobSpec.parse` with ``fmt="toml"`` and with ``fmt="json"`` (what ``--spec`` reads);
* :meth:`JobSpec.from_canonical` (what the server parses from every Join message).

Only ``SpecError`` may escape. An accepted spec must round-trip through its canonical
bytes (``from_canonical(spec.canonical_bytes()) == spec``, same digest), and
``from_canonical`` may accept only the exact canonical bytes of what it returns.

    python fuzz/fuzz_spec.py -max_total_time=3600 fuzz/work/spec fuzz/corpus/spec

See docs/fuzzing.md.
"""

from __future__ import annotations

import sys

import atheris
from _support import amplifying_mutator, guard, with_defaults

# tomllib is pure Python: instrumenting it lets the fuzzer learn TOML's grammar.
with atheris.instrument_imports(include=["teepsi", "tomllib"]):
    import tomllib  # noqa: F401 (imported here to be instrumented)

    from teepsi.contract.spec import JobSpec, SpecError


def _check(spec: JobSpec) -> None:
    canonical = spec.canonical_bytes()
    again = JobSpec.from_canonical(canonical)
    assert again == spec, "canonical bytes do not round-trip"
    assert again.digest() == spec.digest()


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    for fmt in ("toml", "json"):
        try:
            spec = JobSpec.parse(data, source="fuzz", fmt=fmt)
        except SpecError as exc:
            assert "\n" not in str(exc), f"SpecError message is not one line: {exc!r}"
            continue
        _check(spec)
    try:
        spec = JobSpec.from_canonical(data)
    except SpecError as exc:
        assert "\n" not in str(exc), f"SpecError message is not one line: {exc!r}"
        return
    assert spec.canonical_bytes() == data, "from_canonical accepted non-canonical bytes"
    _check(spec)


def main() -> None:
    argv = with_defaults(sys.argv, "spec", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
