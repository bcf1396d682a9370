#!/usr/bin/env python3
"""Fuzz signed receipt parsing.

Target: :meth:`SignedReceipt.from_json` on bytes and on text (what ``--receipt`` files
and result streams carry); only ``ReceiptError`` may escape. An accepted receipt is
canonical: ``to_json`` gives back the input (less one trailing newline), and
:func:`verify_receipt` against an unrelated certificate fails with ``ReceiptError``.

    python fuzz/fuzz_receipt.py -max_total_time=3600 fuzz/work/receipt fuzz/corpus/receipt

See docs/fuzzing.md.
"""

from __future__ import annotations

import sys

import atheris
from _support import amplifying_mutator, guard, with_defaults

with atheris.instrument_imports(include=["teepsi"]):
    from teepsi.contract.receipt import ReceiptError, SignedReceipt, verify_receipt

# The small TCG DICE seed of the ratls corpus would do as well: any certificate that did
# not sign the receipt. Built here so this harness needs nothing but itself.
_CERTIFICATE: bytes | None = None


def _certificate() -> bytes:
    global _CERTIFICATE
    if _CERTIFICATE is None:
        from teepsi.attestation.evidence import Role
        from teepsi.attestation.measure import sim_identity
        from teepsi.attestation.ratls import create_certificate
        from teepsi.attestation.sim import SimEvidenceProvider

        provider = SimEvidenceProvider(sim_identity(Role.SERVER))
        _CERTIFICATE = create_certificate(provider).certificate_der
    return _CERTIFICATE


def TestOneInput(data: bytes) -> None:  # noqa: N802 (the name atheris expects)
    try:
        signed = SignedReceipt.from_json(data)
    except ReceiptError as exc:
        assert "\n" not in str(exc), f"ReceiptError message is not one line: {exc!r}"
        signed = None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        try:
            from_text = SignedReceipt.from_json(text)
        except ReceiptError:
            from_text = None
        assert (from_text is None) == (signed is None), "bytes and text parse differently"
    if signed is None:
        return
    assert signed.to_json().encode() == data.removesuffix(b"\n"), "accepted non-canonical"
    try:
        verify_receipt(signed, _certificate())
    except ReceiptError:
        pass
    else:
        raise AssertionError("a receipt verified under an unrelated certificate")


def main() -> None:
    argv = with_defaults(sys.argv, "receipt", max_len=16384)
    atheris.Setup(argv, guard(TestOneInput), custom_mutator=amplifying_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
