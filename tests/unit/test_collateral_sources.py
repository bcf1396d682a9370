"""Collateral sources, PCCS URL building (no network) and verification under explicit roots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from teepsi.attestation.collateral import (
    CachedSource,
    CollateralError,
    FileSource,
    PccsEndpoints,
    PccsSource,
    QuotePlatform,
    SimulatedSource,
    StapledSource,
)
from teepsi.attestation.collateral.mock import MockCollateralSource
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.sim import SimEvidenceProvider, SimPlatform
from teepsi.attestation.trust import SIMULATED_ROOT, root_for
from teepsi.attestation.verify import QuoteRejected, intel_root, verify_quote
from tests.support.fake_pccs import FakePccs

SGX = QuotePlatform("SGX", "00A067110000", "processor")
TDX = QuotePlatform("TDX", "00806F050000", "platform")


def _sim() -> tuple[SimEvidenceProvider, bytes]:
    provider = SimEvidenceProvider(sim_identity(Role.SERVER), SimPlatform())
    return provider, provider.quote(bytes(64))


def test_endpoints_of_a_bare_host_are_api_v4() -> None:
    urls = PccsEndpoints.parse("https://pccs.example:8081")
    assert (urls.origin, urls.api_version) == ("https://pccs.example:8081", "v4")
    assert urls.pck_crl(SGX) == "https://pccs.example:8081/sgx/certification/v4/pckcrl?ca=processor"
    assert (
        urls.tcb_info(TDX)
        == "https://pccs.example:8081/tdx/certification/v4/tcb?fmspc=00806F050000"
    )
    assert urls.qe_identity(TDX) == "https://pccs.example:8081/tdx/certification/v4/qe/identity"
    assert urls.root_ca_crl() == "https://pccs.example:8081/sgx/certification/v4/rootcacrl"


def test_endpoints_keep_a_v3_path_and_its_prefix() -> None:
    urls = PccsEndpoints.parse("http://10.0.0.5/proxy/sgx/certification/v3/")
    assert (urls.origin, urls.api_version) == ("http://10.0.0.5/proxy", "v3")
    assert urls.tcb_info(SGX) == "http://10.0.0.5/proxy/sgx/certification/v3/tcb?fmspc=00A067110000"
    with pytest.raises(CollateralError, match="TDX collateral needs the v4 API"):
        urls.check_platform(TDX)
    urls.check_platform(SGX)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://pccs/", "not an http:// or https:// URL"),
        ("https://pccs/sgx/certification/v4/?x=1", "must not have a query or fragment"),
        ("https://pccs/#frag", "must not have a query or fragment"),
    ],
)
def test_endpoints_refuse_unusable_urls(url: str, problem: str) -> None:
    with pytest.raises(CollateralError, match=problem):
        PccsEndpoints.parse(url)


def test_mock_source_serves_counts_and_fails_on_demand() -> None:
    mock = MockCollateralSource("{}", by_quote={b"q2": "two"})
    assert mock.collateral_for(b"q1") == "{}"
    assert mock.collateral_for(b"q2") == "two"
    assert mock.requests == [b"q1", b"q2"]
    with pytest.raises(CollateralError, match="no collateral for this quote"):
        MockCollateralSource().collateral_for(b"q")
    with pytest.raises(CollateralError, match="PCCS down"):
        MockCollateralSource("{}", error=CollateralError("PCCS down")).collateral_for(b"q")


def test_stapled_source() -> None:
    assert StapledSource("stapled").collateral_for(b"q") == "stapled"
    with pytest.raises(CollateralError, match="the peer sent none"):
        StapledSource("").collateral_for(b"q")


def test_simulated_source_gives_the_platforms_collateral_for_its_quotes_only() -> None:
    provider, quote = _sim()
    collateral = SimulatedSource(provider).collateral_for(quote)
    assert verify_quote(quote, collateral, root=SIMULATED_ROOT).simulated
    with pytest.raises(CollateralError, match="has no collateral for this quote"):
        SimulatedSource(provider).collateral_for(b"not a quote")


def test_file_source_reads_once(tmp_path: Path) -> None:
    provider, quote = _sim()
    path = tmp_path / "collateral.json"
    path.write_text(provider.platform.collateral_json())
    source = FileSource(path)
    path.unlink()  # read when made, not per quote
    assert json.loads(source.collateral_for(quote))["tcb_info"]
    with pytest.raises(CollateralError, match=r"absent\.json"):
        FileSource(tmp_path / "absent.json")


def test_cached_source_fetches_once_and_checks_against_the_quote() -> None:
    provider, quote = _sim()
    mock = MockCollateralSource(provider.platform.collateral_json())
    cached = CachedSource(mock)
    assert cached.collateral_for(quote) == cached.collateral_for(quote)
    assert mock.requests == [quote]
    other = SimPlatform().collateral_json()  # same simulated PKI: verifies too
    foreign = json.loads(other)
    foreign["tcb_info_signature"] = "00" * 64
    with pytest.raises(CollateralError, match="does not verify our own quote"):
        CachedSource(MockCollateralSource(json.dumps(foreign))).collateral_for(quote)


def test_pccs_source_fetches_from_a_local_pccs() -> None:
    provider, quote = _sim()
    with FakePccs(provider.platform.collateral_json()) as pccs:
        fetched = PccsSource(pccs.url).collateral_for(quote)
    assert verify_quote(quote, fetched, root=SIMULATED_ROOT).tcb_status == "UpToDate"


def test_verify_quote_uses_only_the_root_it_is_given() -> None:
    provider, quote = _sim()
    collateral = provider.platform.collateral_json()
    with pytest.raises(QuoteRejected):
        verify_quote(quote, collateral, root=intel_root())
    verified = verify_quote(quote, collateral, root=SIMULATED_ROOT)
    assert verified.simulated and verified.root == SIMULATED_ROOT.name
    assert root_for(quote, allow_simulated=False) == intel_root()
    assert root_for(quote, allow_simulated=True) is SIMULATED_ROOT
