"""Where collateral for a quote comes from: one small interface, one class per origin.

A :class:`CollateralSource` answers "collateral for this quote" with dcap-qvl's JSON form
or a one-line :class:`CollateralError`. Fetching calls verification (a cached source
checks what it fetched against the quote it serves), never the reverse: verification
takes collateral as an argument.

* :class:`PccsSource`: fetched from a PCCS (or Intel's PCS) each time;
* :class:`FileSource`: a collateral file, read once;
* :class:`StapledSource`: what the peer stapled to its evidence;
* :class:`SimulatedSource`: the simulated platform's, from its evidence provider;
* :class:`CachedSource`: another source behind a :class:`CollateralCache`, each
  fetch checked against the quote (for one's own quote, handed out to peers).

:class:`teepsi.attestation.collateral.mock.MockCollateralSource` stands in for any of
them in tests.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from pathlib import Path

from teepsi.attestation.collateral.cache import CollateralCache
from teepsi.attestation.collateral.documents import load_collateral_file
from teepsi.attestation.collateral.errors import CollateralError
from teepsi.attestation.collateral.pccs import DEFAULT_TIMEOUT_SECONDS, fetch_collateral
from teepsi.attestation.collateral.qcnl import pccs_settings
from teepsi.attestation.evidence import EvidenceProvider
from teepsi.attestation.verify import QuoteVerificationError

log = logging.getLogger(__name__)


class CollateralSource(ABC):
    """Gives collateral (dcap-qvl JSON) for a quote, or raises CollateralError."""

    #: Names the source in messages and logs, e.g. "PCCS https://pccs:8081/".
    description: str = "collateral source"

    @abstractmethod
    def collateral_for(self, quote: bytes) -> str:
        """Collateral for ``quote``; CollateralError (one line) when there is none."""


class PccsSource(CollateralSource):
    """Fetched from ``pccs_url``, or the QCNL file's URL (:func:`pccs_settings`)."""

    def __init__(
        self,
        pccs_url: str | None,
        qcnl_path: Path | None = None,
        *,
        verify_tls: bool | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.pccs_url = pccs_url
        self.qcnl_path = qcnl_path
        self.verify_tls = verify_tls
        self.timeout = timeout
        self.description = f"PCCS {pccs_url}" if pccs_url else "PCCS from the QCNL config"

    def collateral_for(self, quote: bytes) -> str:
        # Settings are read per fetch: an operator may fix the QCNL file while we run.
        settings = pccs_settings(self.pccs_url, self.qcnl_path, verify_tls=self.verify_tls)
        return fetch_collateral(
            quote, settings.url, verify_tls=settings.verify_tls, timeout=self.timeout
        )


class FileSource(CollateralSource):
    """A collateral file (dcap-qvl JSON), read and checked once, when made."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"collateral file {path}"
        self._collateral = load_collateral_file(path)

    def collateral_for(self, quote: bytes) -> str:
        return self._collateral


class StapledSource(CollateralSource):
    """What the peer stapled to its evidence (Intel-signed: relaying it is safe)."""

    description = "the peer's stapled collateral"

    def __init__(self, stapled_json: str | None) -> None:
        self.stapled_json = stapled_json or None

    def collateral_for(self, quote: bytes) -> str:
        if self.stapled_json is None:
            raise CollateralError("no collateral for the quote: the peer sent none")
        return self.stapled_json


class SimulatedSource(CollateralSource):
    """A simulated platform's own collateral, as its evidence provider makes it."""

    description = "the simulated platform"

    def __init__(self, provider: EvidenceProvider) -> None:
        self.provider = provider

    def collateral_for(self, quote: bytes) -> str:
        collateral = self.provider.collateral_json(quote)
        if not collateral:
            raise CollateralError(
                f"evidence provider {self.provider.name!r} has no collateral for this quote"
            )
        return collateral


def _check_own_quote(quote: bytes, collateral_json: str, now: int) -> None:
    """Collateral for one's own quote is checked before it is handed out.

    Simulation is allowed here only to pick the simulated root for simulated quotes; a
    real quote is checked against Intel's root either way.
    """
    # Imported here: trust reads collateral dates (this package), so a module-level
    # import would be circular whichever of the two is imported first.
    from teepsi.attestation.trust import verify_trusted_quote

    try:
        verified = verify_trusted_quote(quote, collateral_json, allow_simulated=True, now=now)
    except QuoteVerificationError as exc:
        raise CollateralError(f"fetched collateral does not verify our own quote: {exc}") from None
    log.info(
        "collateral for our own quote: TCB status %s%s",
        verified.tcb_status,
        f" ({', '.join(verified.advisory_ids)})" if verified.advisory_ids else "",
    )


class CachedSource(CollateralSource):
    """``inner`` behind a cache: each fetch is checked against the quote, then kept."""

    def __init__(
        self, inner: CollateralSource, cache: CollateralCache | None = None, *, check: bool = True
    ) -> None:
        self.inner = inner
        self.cache = cache if cache is not None else CollateralCache()
        self.check = check
        self.description = f"{inner.description} (cached)"

    def collateral_for(self, quote: bytes) -> str:
        return self.cache.get(
            quote, self.inner.collateral_for, validate=_check_own_quote if self.check else None
        )


def collateral_for_quote(
    quote: bytes,
    *,
    pccs_url: str | None,
    qcnl_path: Path | None,
    cache: CollateralCache,
    verify_tls: bool | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> str:
    """Collateral for one's own quote, from a PCCS through ``cache`` (see CachedSource)."""
    pccs = PccsSource(pccs_url, qcnl_path, verify_tls=verify_tls, timeout=timeout)
    return CachedSource(pccs, cache).collateral_for(quote)
