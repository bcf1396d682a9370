"""A :class:`CollateralSource` for tests: answers from a table, counts what it was asked."""

from __future__ import annotations

from teepsi.attestation.collateral.errors import CollateralError
from teepsi.attestation.collateral.sources import CollateralSource


class MockCollateralSource(CollateralSource):
    """Serves ``collateral`` for every quote, or per quote from ``by_quote``.

    ``error`` makes every call fail with it instead (an unreachable PCCS, say). Each call
    is appended to :attr:`requests`, so a test can tell whether, and for what, the code
    under test asked.
    """

    description = "mock collateral source"

    def __init__(
        self,
        collateral: str | None = None,
        *,
        by_quote: dict[bytes, str] | None = None,
        error: CollateralError | None = None,
    ) -> None:
        self.collateral = collateral
        self.by_quote = dict(by_quote or {})
        self.error = error
        self.requests: list[bytes] = []

    def collateral_for(self, quote: bytes) -> str:
        self.requests.append(bytes(quote))
        if self.error is not None:
            raise self.error
        found = self.by_quote.get(bytes(quote), self.collateral)
        if found is None:
            raise CollateralError("mock collateral source: no collateral for this quote")
        return found
