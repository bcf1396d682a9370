"""What a data provider gets back, and the check of the server's receipt for it."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import polars as pl

from teepsi.attestation.peer import TrustedPeer
from teepsi.client.config import PartyConfig
from teepsi.client.connection import PsiClient, ReceivedResult
from teepsi.contract.outputs import OutputKind
from teepsi.contract.receipt import ReceiptError, SignedReceipt, check_own_entry, verify_receipt
from teepsi.engine.matching import MatchingRows
from teepsi.engine.tables import Table
from teepsi.protocol.connect import PsiClientError


@dataclass(frozen=True)
class PartyResult:
    """What a data provider gets back, with the counts it reports."""

    #: The party's own rows whose key is in the intersection, ordered by key, read a
    #: piece at a time as they are written (``write_rows(result.matching, ...)``). For
    #: text input a single column "item" of the distinct matching items, sorted bytewise.
    matching: MatchingRows
    #: RELEASED, COUNT_ONLY, NOT_RECIPIENT or BELOW_THRESHOLD (the job spec's rules).
    status: str
    #: Size of the intersection (distinct keys); None when below the spec's threshold.
    intersection_size: int | None
    result_sha256: bytes
    rows_read: int
    rows_with_key: int
    distinct_keys: int
    server: TrustedPeer
    job_id: str
    party_name: str
    receipt: SignedReceipt | None = None
    server_certificate_der: bytes = b""
    #: The collateral the server's certificate was verified with (dcap-qvl JSON): saved
    #: with the receipt so it can be verified again offline.
    server_collateral_json: str = ""

    @cached_property
    def rows(self) -> pl.DataFrame:
        """Every matching row at once (see ``matching``), read on first use."""
        return self.matching.frame()

    def matching_items(self) -> list[str]:
        """Text input: the intersecting items, as a list."""
        return [str(v) for v in self.rows.to_series(0).to_list()]


def check_receipt(
    config: PartyConfig, client: PsiClient, got: ReceivedResult, table: Table
) -> SignedReceipt | None:
    """Verify the server's signature and, under a job spec, our own entry."""
    if not got.receipt_json:
        return None
    try:
        signed = SignedReceipt.from_json(got.receipt_json)
        verify_receipt(signed, client.server_certificate_der)
        receipt = signed.receipt
        if receipt.job_id != config.job_id:
            raise ReceiptError(f"receipt is for job {receipt.job_id!r}")
        server_tee = client.server.verified.tee_type if client.server is not None else None
        if server_tee is not None and receipt.tee != server_tee:
            raise ReceiptError(
                f"receipt says an {receipt.tee} TEE signed it; the server is {server_tee}"
            )
        expected_spec = config.spec.digest() if config.spec is not None else b""
        if receipt.spec_sha256 != expected_spec:
            raise ReceiptError("receipt names another job spec")
        if (
            got.status == "RELEASED"
            and receipt.output is OutputKind.INTERSECTION
            and receipt.result_sha256 != got.salted_sha256
        ):
            raise ReceiptError("receipt's result digest differs from the result received")
        if config.spec is not None or config.resume:
            # Under a spec always; on a resume also in quick mode: the result must be the
            # one of the set this run holds (a changed --data would map it to wrong rows).
            items, own = table.own_set(got.set_salt)
            check_own_entry(signed, name=config.name, items=items, set_sha256=own)
    except ReceiptError as exc:
        withheld = (
            f"; the {got.total} result records are withheld (not written)" if len(got.hi) else ""
        )
        raise PsiClientError(
            f"the server's receipt does not check out: {exc}{withheld}: the server does not "
            "vouch for this result"
        ) from None
    return signed
