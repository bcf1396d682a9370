"""Fetching collateral from a fake PCCS on loopback: endpoints, TLS, errors, the cache."""

from __future__ import annotations

import json
import time
from email.message import Message
from pathlib import Path

import pytest

from teepsi.attestation.collateral import (
    CollateralCache,
    CollateralError,
    PccsClient,
    collateral_for_quote,
    fetch_collateral,
)
from teepsi.attestation.collateral import pccs as pccs_mod
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.trust import verify_trusted_quote
from tests.support.fake_pccs import FakePccs
from tests.unit.test_collateral import (
    DAY,
    PINNED,
    Clock,
    _one_line,
    _sim,
    _sim_collateral,
    _vector,
)


@pytest.mark.parametrize(
    ("api_version", "crl_encoding"),
    [("v4", "der"), ("v4", "pem"), ("v3", "hex"), ("v3", "der")],
)
def test_fetch_real_sgx_vector_verifies(api_version: str, crl_encoding: str) -> None:
    quote, expected = _vector("sgx_quote")
    with FakePccs(expected, api_version=api_version, crl_encoding=crl_encoding) as pccs:
        fetched = fetch_collateral(quote, pccs.url)
        assert pccs.paths == [
            f"/sgx/certification/{api_version}/pckcrl",
            f"/sgx/certification/{api_version}/tcb",
            f"/sgx/certification/{api_version}/qe/identity",
            f"/sgx/certification/{api_version}/rootcacrl",
        ]
    # Same documents, byte for byte where Intel's signatures cover them.
    assert json.loads(fetched) == json.loads(expected)
    verified = verify_trusted_quote(quote, fetched, now=PINNED)
    assert verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verified.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")


def test_fetch_tdx_vector_uses_tdx_endpoints() -> None:
    quote, expected = _vector("tdx_quote")
    with FakePccs(expected) as pccs:
        fetched = fetch_collateral(quote, pccs.url)
        assert "/tdx/certification/v4/tcb" in pccs.paths
        assert "/tdx/certification/v4/qe/identity" in pccs.paths
        assert "/sgx/certification/v4/pckcrl" in pccs.paths
    assert verify_trusted_quote(quote, fetched, now=PINNED).tcb_status == "UpToDate"


def test_fetch_for_sim_quote_verifies_now() -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json()) as pccs:
        fetched = fetch_collateral(quote, pccs.url)
    verified = verify_trusted_quote(quote, fetched, allow_simulated=True)
    assert verified.simulated and verified.tcb_status == "UpToDate"
    assert verified.identity == sim_identity(Role.SERVER)


def test_bare_host_url_means_api_v4() -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json()) as pccs:
        fetch_collateral(quote, pccs.origin)
        fetch_collateral(quote, pccs.origin + "/")
        assert all(path.startswith("/sgx/certification/v4/") for path in pccs.paths)


def test_self_signed_pccs_needs_insecure_tls() -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json(), tls=True) as pccs:
        with pytest.raises(CollateralError) as exc:
            fetch_collateral(quote, pccs.url)
        assert "USE_SECURE_CERT=FALSE" in _one_line(exc)
        fetched = fetch_collateral(quote, pccs.url, verify_tls=False)
    assert verify_trusted_quote(quote, fetched, allow_simulated=True).simulated


def test_pccs_down() -> None:
    platform, quote = _sim()
    pccs = FakePccs(platform.collateral_json())
    url = pccs.url
    pccs.close()
    with pytest.raises(CollateralError) as exc:
        fetch_collateral(quote, url, timeout=5)
    text = _one_line(exc)
    assert text.startswith("cannot reach PCCS for PCK CRL") and url in text


@pytest.mark.parametrize("status", [404, 500, 503])
def test_pccs_error_status(status: int) -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json()) as pccs:
        pccs.fail_status = status
        with pytest.raises(CollateralError) as exc:
            fetch_collateral(quote, pccs.url)
    assert f"HTTP {status}" in _one_line(exc)
    assert "PCK CRL" in str(exc.value)


def test_pccs_without_this_fmspc() -> None:
    quote, _ = _vector("sgx_quote")
    platform, _ = _sim()
    # The fake serves the simulated platform's FMSPC only.
    with FakePccs(platform.collateral_json()) as pccs, pytest.raises(CollateralError) as exc:
        fetch_collateral(quote, pccs.url)
    assert "TCB info (FMSPC 00A067110000)" in _one_line(exc)
    assert "HTTP 404" in str(exc.value)


def test_missing_root_ca_crl_without_distribution_point() -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json()) as pccs:
        pccs.missing.add("rootcacrl")
        with pytest.raises(CollateralError) as exc:
            fetch_collateral(quote, pccs.url)
    assert "root CA CRL" in _one_line(exc) and "HTTP 404" in str(exc.value)


def test_root_ca_crl_from_distribution_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """Intel's PCS has no /rootcacrl: the root certificate names where its CRL is."""
    quote, expected = _vector("sgx_quote")
    root_crl = bytes.fromhex(json.loads(expected)["root_ca_crl"])
    asked: list[str] = []
    original = PccsClient._get

    def fake_get(self: PccsClient, url: str, what: str) -> object:
        if url.startswith("https://certificates.trustedservices.intel.com/"):
            asked.append(url)
            return pccs_mod._Response(headers=Message(), body=root_crl)
        return original(self, url, what)

    monkeypatch.setattr(PccsClient, "_get", fake_get)
    with FakePccs(expected) as pccs:
        pccs.missing.add("rootcacrl")
        fetched = fetch_collateral(quote, pccs.url)
    assert asked == ["https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"]
    assert verify_trusted_quote(quote, fetched, now=PINNED).tcb_status.startswith("Configuration")


def test_redirects_to_http_only() -> None:
    platform, quote = _sim()
    with (
        FakePccs(platform.collateral_json()) as real,
        FakePccs(platform.collateral_json()) as front,
    ):
        front.redirect = real.origin
        fetched = fetch_collateral(quote, front.url)
        assert real.count("tcb") == 1
        front.redirect = "ftp://127.0.0.1:21"
        with pytest.raises(CollateralError) as exc:
            fetch_collateral(quote, front.url)
    assert verify_trusted_quote(quote, fetched, allow_simulated=True).simulated
    assert "HTTP 302" in _one_line(exc)


def _own_quote_cache(t0: int, **options: object) -> tuple[FakePccs, bytes, CollateralCache, Clock]:
    platform, quote = _sim(t0, 2 * DAY)
    pccs = FakePccs(platform.collateral_json())
    clock = Clock(t0 + 60)
    cache = CollateralCache(clock=clock, **options)  # type: ignore[arg-type]
    return pccs, quote, cache, clock


def test_cache_hit_and_refetch_after_next_update() -> None:
    t0 = int(time.time()) - 600
    pccs, quote, cache, clock = _own_quote_cache(t0, refresh_margin=0, max_age=None)
    with pccs:
        first = collateral_for_quote(quote, pccs_url=pccs.url, qcnl_path=None, cache=cache)
        assert pccs.count("tcb") == 1 and pccs.total() == 4
        clock.now = t0 + DAY
        assert collateral_for_quote(quote, pccs_url=pccs.url, qcnl_path=None, cache=cache) == first
        assert pccs.total() == 4 and cache.stats.hits == 1
        # The PCCS has newer collateral; it is fetched once the cached one expires.
        newer = _sim_collateral(t0 + 2 * DAY - 100, 2 * DAY)
        pccs.set_collateral(newer)
        clock.now = t0 + 2 * DAY - 1
        assert collateral_for_quote(quote, pccs_url=pccs.url, qcnl_path=None, cache=cache) == first
        clock.now = t0 + 2 * DAY + 1
        second = collateral_for_quote(quote, pccs_url=pccs.url, qcnl_path=None, cache=cache)
        assert second == newer and pccs.count("tcb") == 2
    assert verify_trusted_quote(quote, second, allow_simulated=True, now=int(clock.now)).simulated


def test_cache_refreshes_daily_and_before_expiry() -> None:
    t0 = int(time.time()) - 600
    pccs, quote, cache, clock = _own_quote_cache(t0)  # defaults: 1 h margin, 24 h max age
    with pccs:
        cache.get(quote, lambda q: fetch_collateral(q, pccs.url))
        clock.now = t0 + 2 * DAY - 1800  # within an hour of nextUpdate
        cache.get(quote, lambda q: fetch_collateral(q, pccs.url))
        assert pccs.count("tcb") == 2


def test_cache_serves_old_collateral_while_refresh_fails() -> None:
    t0 = int(time.time()) - 600
    pccs, quote, cache, clock = _own_quote_cache(t0, max_age=3600, retry_interval=60)
    with pccs:
        first = cache.get(quote, lambda q: fetch_collateral(q, pccs.url))
        pccs.fail_status = 503
        clock.now = t0 + 2 * 3600
        assert cache.get(quote, lambda q: fetch_collateral(q, pccs.url)) == first
        assert cache.stats.failures == 1
        before = pccs.total()
        clock.now += 30  # within retry_interval: no new attempt
        assert cache.get(quote, lambda q: fetch_collateral(q, pccs.url)) == first
        assert pccs.total() == before
        clock.now = t0 + 2 * DAY + 1  # expired: nothing valid to hand out
        with pytest.raises(CollateralError) as exc:
            cache.get(quote, lambda q: fetch_collateral(q, pccs.url))
        assert "HTTP 503" in _one_line(exc)


def test_cache_refuses_older_collateral_on_refresh() -> None:
    t0 = int(time.time()) - 3 * DAY
    pccs, quote, cache, clock = _own_quote_cache(t0, max_age=3600)
    pccs.set_collateral(_sim_collateral(t0 + DAY, 2 * DAY))
    clock.now = t0 + DAY + 60
    with pccs:
        newer = cache.get(quote, lambda q: fetch_collateral(q, pccs.url))
        pccs.set_collateral(_sim_collateral(t0, 2 * DAY))  # a replayed, older set
        clock.now += 7200
        assert cache.get(quote, lambda q: fetch_collateral(q, pccs.url)) == newer
        assert cache.stats.failures == 1


def test_collateral_for_quote_reads_qcnl(tmp_path: Path) -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json(), tls=True) as pccs:
        conf = tmp_path / "sgx_default_qcnl.conf"
        conf.write_text(
            '{\n  // our PCCS\n  "pccs_url": "' + pccs.url + '"\n  ,"use_secure_cert": false\n}\n'
        )
        got = collateral_for_quote(quote, pccs_url=None, qcnl_path=conf, cache=CollateralCache())
        assert verify_trusted_quote(quote, got, allow_simulated=True).simulated
        conf.write_text(f"PCCS_URL={pccs.url}\nUSE_SECURE_CERT=TRUE\n")
        with pytest.raises(CollateralError) as exc:
            collateral_for_quote(quote, pccs_url=None, qcnl_path=conf, cache=CollateralCache())
        assert "certificate verify failed" in _one_line(exc)
