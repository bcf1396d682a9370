#!/usr/bin/env python3
"""Fuzz policy parsing (``dynamic_config.json``).

Targets, on every input:

* :meth:`Policy.load` on the bytes written to a file: only ``PolicyError`` may escape;
* :meth:`Policy.from_dict` on ``json.loads`` of the bytes (inputs that are not JSON are
  skipped: that is the harness's own decoding): only ``PolicyError`` may escape.

An accepted policy must survive ``to_dict`` -> ``from_dict`` unchanged, and both entry
points must agree when both accept.

    python fuzz/fuzz_policy.py -max_total_time=3600 fuzz/work/policy fuzz/corpus/policy

See docs/fuzzing.md.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import tempfile

import atheris
from _support import amplifying_mutator, guard, with_defaults

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.attestation.policy import Policy, PolicyError

# An all-off policy logs a loud warning each time it is built.
logging.disable(logging.CRITICAL)

# Policy.load reads a path: write each input to a file, in memory where the OS allows
# (a disk-backed /tmp can cost milliseconds per open, most of an iteration).
# mkdtemp makes a private (0700) directory, so a shared /dev/shm is fine.
_SHM = "/dev/shm"  # noqa: S108
_WORKDIR = tempfile.mkdtemp(prefix="teepsi-fuzz-policy-", dir=_SHM if os.path.isdir(_SHM) else None)
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
POLICY_FILE = os.path.join(_WORKDIR, "dynamic_config.json")


def _check_one_line(exc: Exception) -> None:
    assert "\n" not in str(exc), f"PolicyError message is not one line: {exc!r}"


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    with open(POLICY_FILE, "wb") as handle:
        handle.write(data)
    loaded: Policy | None
    try:
        loaded = Policy.load(POLICY_FILE)
    except PolicyError as exc:
        _check_one_line(exc)
        loaded = None
    if loaded is not None:
        assert Policy.from_dict(loaded.to_dict()) == loaded, "to_dict/from_dict round trip"

    try:
        parsed_json = json.loads(data)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError is a ValueError)
        return
    try:
        policy = Policy.from_dict(parsed_json)
    except PolicyError as exc:
        _check_one_line(exc)
        return
    assert Policy.from_dict(policy.to_dict()) == policy, "to_dict/from_dict round trip"
    if loaded is not None:
        assert loaded == policy, "Policy.load and Policy.from_dict disagree"


def main() -> None:
    argv = with_defaults(sys.argv, "policy", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
