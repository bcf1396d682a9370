"""The URLs of the Intel PCS / PCCS API (versions 3 and 4), built without a network.

``base`` is ``…/sgx/certification/vN``; TDX quotes take TCB info and QE identity from
``…/tdx/certification/v4``. A bare host (no ``…/certification/vN`` path) means API v4,
as Intel's PCS and current PCCS serve it.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from teepsi.attestation.collateral.errors import CollateralError
from teepsi.attestation.collateral.platform import QuotePlatform
from teepsi.attestation.collateral.qcnl import check_url

_API_PATH = re.compile(r"/(sgx|tdx)/certification/(v[0-9]+)$")


@dataclass(frozen=True)
class PccsEndpoints:
    """Where each collateral document of one PCCS is, for a given platform."""

    #: The URL as configured (checked: http or https, no query or fragment).
    url: str
    #: ``scheme://host[:port][/prefix]``: everything before ``/sgx/certification/…``.
    origin: str
    #: ``"v3"`` or ``"v4"`` (or any ``vN`` the URL names).
    api_version: str

    @classmethod
    def parse(cls, pccs_url: str) -> PccsEndpoints:
        """Read origin and API version from a PCCS URL; CollateralError when unusable."""
        url = check_url(pccs_url, "PCCS URL")
        parts = urllib.parse.urlsplit(url)
        if parts.query or parts.fragment:
            raise CollateralError(f"PCCS URL: {pccs_url!r} must not have a query or fragment")
        path = parts.path.rstrip("/")
        match = _API_PATH.search(path)
        prefix, api_version = (path[: match.start()], match.group(2)) if match else (path, "v4")
        return cls(
            url=url, origin=f"{parts.scheme}://{parts.netloc}{prefix}", api_version=api_version
        )

    @property
    def hostname(self) -> str | None:
        return urllib.parse.urlsplit(self.url).hostname

    def base(self, tee: str) -> str:
        """``{origin}/{sgx|tdx}/certification/{version}``."""
        return f"{self.origin}/{tee}/certification/{self.api_version}"

    def check_platform(self, platform: QuotePlatform) -> None:
        """Refuse a platform this API version cannot serve (TDX needs v4)."""
        if platform.tee_type == "TDX" and self.api_version != "v4":
            raise CollateralError(
                f"PCCS URL {self.url}: TDX collateral needs the v4 API (…/certification/v4/)"
            )

    def pck_crl(self, platform: QuotePlatform) -> str:
        return f"{self.base('sgx')}/pckcrl?ca={platform.ca}"

    def tcb_info(self, platform: QuotePlatform) -> str:
        return f"{self.base(platform.tee_type.lower())}/tcb?fmspc={platform.fmspc}"

    def qe_identity(self, platform: QuotePlatform) -> str:
        return f"{self.base(platform.tee_type.lower())}/qe/identity"

    def root_ca_crl(self) -> str:
        """PCCS only; Intel's PCS lacks it (the root's CRL distribution point is used)."""
        return f"{self.base('sgx')}/rootcacrl"
