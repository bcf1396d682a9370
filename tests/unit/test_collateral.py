"""Collateral: the PCCS client against a fake PCCS on loopback, the cache, rollback refusal,
QCNL configuration and collateral files."""

from __future__ import annotations

import json
import threading
import time
from email.message import Message
from pathlib import Path

import pytest

from teepsi.attestation import collateral as collateral_mod
from teepsi.attestation.collateral import (
    CollateralCache,
    CollateralError,
    CollateralFreshness,
    CollateralRollbackError,
    PccsClient,
    QcnlConfig,
    collateral_for_quote,
    describe_collateral,
    fetch_collateral,
    load_collateral_file,
    pccs_settings,
)
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig
from teepsi.attestation.verify import verify_quote
from tests.support.fake_pccs import FakePccs

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "sgx-dcap"
PINNED = 1750330631
DAY = 24 * 3600


def _vector(name: str) -> tuple[bytes, str]:
    return (VECTORS / name).read_bytes(), (VECTORS / f"{name}_collateral.json").read_text()


def _sim(issued: int | None = None, validity: int = 30 * DAY) -> tuple[SimPlatform, bytes]:
    platform = SimPlatform(
        SimPlatformConfig(collateral_issued_at=issued, collateral_validity_seconds=validity)
    )
    return platform, platform.quote(sim_identity(Role.SERVER), bytes(64))


def _sim_collateral(issued: int, validity: int = 30 * DAY) -> str:
    platform, _ = _sim(issued, validity)
    return platform.collateral_json()


def _one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# --- fetching --------------------------------------------------------------------------


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
    verified = verify_quote(quote, fetched, now=PINNED)
    assert verified.tcb_status == "ConfigurationAndSWHardeningNeeded"
    assert verified.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")


def test_fetch_tdx_vector_uses_tdx_endpoints() -> None:
    quote, expected = _vector("tdx_quote")
    with FakePccs(expected) as pccs:
        fetched = fetch_collateral(quote, pccs.url)
        assert "/tdx/certification/v4/tcb" in pccs.paths
        assert "/tdx/certification/v4/qe/identity" in pccs.paths
        assert "/sgx/certification/v4/pckcrl" in pccs.paths
    assert verify_quote(quote, fetched, now=PINNED).tcb_status == "UpToDate"


def test_fetch_for_sim_quote_verifies_now() -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json()) as pccs:
        fetched = fetch_collateral(quote, pccs.url)
    verified = verify_quote(quote, fetched, allow_simulated=True)
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
    assert verify_quote(quote, fetched, allow_simulated=True).simulated


@pytest.mark.parametrize("url", ["ftp://pccs:8081/", "pccs:8081", "", "https:///sgx/"])
def test_bad_pccs_url(url: str) -> None:
    _, quote = _sim()
    with pytest.raises(CollateralError) as exc:
        fetch_collateral(quote, url)
    assert "not an http:// or https:// URL" in _one_line(exc)


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
            return collateral_mod._Response(headers=Message(), body=root_crl)
        return original(self, url, what)

    monkeypatch.setattr(PccsClient, "_get", fake_get)
    with FakePccs(expected) as pccs:
        pccs.missing.add("rootcacrl")
        fetched = fetch_collateral(quote, pccs.url)
    assert asked == ["https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"]
    assert verify_quote(quote, fetched, now=PINNED).tcb_status.startswith("Configuration")


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
    assert verify_quote(quote, fetched, allow_simulated=True).simulated
    assert "HTTP 302" in _one_line(exc)


def test_quote_without_pck_chain() -> None:
    with pytest.raises(CollateralError) as exc:
        fetch_collateral(b"\x03\x00" + bytes(100), "http://127.0.0.1:1/")
    assert "quote" in _one_line(exc)


# --- the cache -------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


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
    assert verify_quote(quote, second, allow_simulated=True, now=int(clock.now)).simulated


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


def test_cache_refuses_collateral_that_does_not_verify_the_quote() -> None:
    _, quote = _sim()
    _, intel = _vector("sgx_quote")
    cache = CollateralCache(clock=Clock(PINNED))
    with pytest.raises(CollateralError) as exc:
        cache.get(quote, lambda q: intel, validate=collateral_mod._validate_own_quote)
    assert "does not verify our own quote" in _one_line(exc)


def test_cache_fetches_once_for_concurrent_callers() -> None:
    platform, quote = _sim()
    cache = CollateralCache()
    calls: list[int] = []
    gate = threading.Event()

    def slow_fetch(q: bytes) -> str:
        calls.append(1)
        gate.wait(5)
        return platform.collateral_json()

    results: list[str] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get(quote, slow_fetch)))
        for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(results) == 8 and len(set(results)) == 1


def test_collateral_for_quote_reads_qcnl(tmp_path: Path) -> None:
    platform, quote = _sim()
    with FakePccs(platform.collateral_json(), tls=True) as pccs:
        conf = tmp_path / "sgx_default_qcnl.conf"
        conf.write_text(
            '{\n  // our PCCS\n  "pccs_url": "' + pccs.url + '"\n  ,"use_secure_cert": false\n}\n'
        )
        got = collateral_for_quote(quote, pccs_url=None, qcnl_path=conf, cache=CollateralCache())
        assert verify_quote(quote, got, allow_simulated=True).simulated
        conf.write_text(f"PCCS_URL={pccs.url}\nUSE_SECURE_CERT=TRUE\n")
        with pytest.raises(CollateralError) as exc:
            collateral_for_quote(quote, pccs_url=None, qcnl_path=conf, cache=CollateralCache())
        assert "certificate verify failed" in _one_line(exc)


# --- rollback refusal ------------------------------------------------------------------


SOURCE = "ppid:00112233445566778899aabbccddeeff"


def test_rollback_refused() -> None:
    t0 = int(time.time()) - 10 * DAY
    old, new = _sim_collateral(t0), _sim_collateral(t0 + 5 * DAY)
    freshness = CollateralFreshness()
    freshness.observe(old, source=SOURCE)
    freshness.observe(new, source=SOURCE)
    freshness.observe(new, source=SOURCE)  # the same collateral again is fine
    with pytest.raises(CollateralRollbackError) as exc:
        freshness.observe(old, source=SOURCE)
    text = _one_line(exc)
    assert text.startswith(f"collateral issued {collateral_mod.iso_utc(t0)} is older than ")
    assert f"this platform showed before ({collateral_mod.iso_utc(t0 + 5 * DAY)})" in text
    assert text.endswith("refusing a possible rollback")


def _with_evaluation_number(collateral_json: str, number: int) -> str:
    # The tracker reads dates and numbers only; signatures are dcap-qvl's business.
    doc = json.loads(collateral_json)
    tcb_info = json.loads(doc["tcb_info"])
    tcb_info["tcbEvaluationDataNumber"] = number
    doc["tcb_info"] = json.dumps(tcb_info)
    return json.dumps(doc)


def test_tolerance_for_several_sources_but_never_a_lower_evaluation_number() -> None:
    t0 = int(time.time()) - 10 * DAY
    freshness = CollateralFreshness(tolerance_seconds=DAY)
    freshness.observe(_sim_collateral(t0 + DAY), source=SOURCE)
    freshness.observe(_sim_collateral(t0 + 1), source=SOURCE)  # a day older than seen: tolerated
    with pytest.raises(CollateralRollbackError):
        freshness.observe(_sim_collateral(t0 - 1), source=SOURCE)
    with pytest.raises(CollateralRollbackError) as exc:
        freshness.observe(_with_evaluation_number(_sim_collateral(t0 + DAY), 16), source=SOURCE)
    assert "TCB evaluation data number 16, lower than 17" in _one_line(exc)
    freshness.observe(_with_evaluation_number(_sim_collateral(t0 + DAY), 18), source=SOURCE)
    with pytest.raises(CollateralRollbackError):
        freshness.observe(_sim_collateral(t0 + DAY), source=SOURCE)  # back to 17


def test_check_does_not_record() -> None:
    t0 = int(time.time()) - 10 * DAY
    freshness = CollateralFreshness()
    freshness.check(_sim_collateral(t0 + DAY), source=SOURCE)
    freshness.observe(_sim_collateral(t0), source=SOURCE)  # nothing was recorded by check()


def test_rollback_state_persists(tmp_path: Path) -> None:
    t0 = int(time.time()) - 10 * DAY
    state = tmp_path / "collateral-state.json"
    CollateralFreshness(state).observe(_sim_collateral(t0 + DAY), source=SOURCE)
    assert json.loads(state.read_text())["version"] == 2
    with pytest.raises(CollateralRollbackError):
        CollateralFreshness(state).observe(_sim_collateral(t0), source=SOURCE)
    state.write_text("{not json")
    with pytest.raises(CollateralError) as exc:
        CollateralFreshness(state)
    assert str(state) in _one_line(exc)


def test_rollback_state_is_per_trust_root() -> None:
    """Simulated collateral dated now must not make Intel's real collateral look old."""
    freshness = CollateralFreshness()
    freshness.observe(_sim_collateral(int(time.time()) - 600), source=SOURCE)
    _, intel = _vector("sgx_quote")
    freshness.observe(intel, source=SOURCE)


def test_rollback_refusal_in_the_verification_path() -> None:
    """The one path records after acceptance and refuses older collateral afterwards."""
    from teepsi.attestation.peer import PeerRejected, PeerVerifier

    t0 = int(time.time()) - 10 * DAY
    platform_new, quote = _sim(t0 + 5 * DAY)
    verifier = PeerVerifier(None, allow_simulated=True)
    new = platform_new.collateral_json()
    verifier.verify_bound_quote(quote, new, quote[368:432], what="peer", role=None)
    old = _sim_collateral(t0)
    verify_quote(quote, old, allow_simulated=True, now=t0 + 60)  # a host with its clock rolled back
    with pytest.raises(PeerRejected, match="refusing a possible rollback"):
        verifier.verify_bound_quote(quote, old, quote[368:432], what="peer", role=None, at=t0 + 60)


def test_describe_collateral_on_vector() -> None:
    _, text = _vector("sgx_quote")
    info = describe_collateral(text)
    assert info.fmspc == "00A067110000" and info.tee_type == "SGX"
    kinds = [item.kind for item in info.items]
    assert kinds == ["TCB info", "QE identity", "PCK CRL", "root CA CRL"]
    assert collateral_mod.iso_utc(info.items[0].issued) == "2025-06-19T10:56:11Z"
    assert info.expired(PINNED) == []
    assert "root CA CRL (Intel SGX Root CA) expired 2026-04-03" in info.describe_expired(1800000000)


# --- QCNL configuration ----------------------------------------------------------------

LEGACY_CONF = """\
# PCCS server address
PCCS_URL=https://localhost:8081/sgx/certification/v3/

# To accept insecure HTTPS certificate, set this option to FALSE
USE_SECURE_CERT=FALSE

# You can use Intel PCS to get quote verification collateral
#COLLATERAL_SERVICE=https://api.trustedservices.intel.com/sgx/certification/v3/
#PCCS_API_VERSION=3.1
#RETRY_TIMES=6
"""

JSON_CONF = """\
{
  // *** ATTENTION : This file is in JSON format so the keys are case sensitive.

  //PCCS server address
  "pccs_url": "https://pccs.example:8081/sgx/certification/v4/"

  // To accept insecure HTTPS certificate, set this option to false
  ,"use_secure_cert": false

  //,"collateral_service": "https://api.trustedservices.intel.com/sgx/certification/v4/"
  /* a block comment, "with quotes" */
  ,"retry_times": 6
  ,"retry_delay": 10
  ,"pck_cache_expire_hours": 168
  ,"local_cache_only": false
  //,"custom_request_options" : {
  //  "get_cert" : { "headers": { "head1": "value1" } }
  //}
}
"""


def test_qcnl_legacy_format(tmp_path: Path) -> None:
    path = tmp_path / "sgx_default_qcnl.conf"
    path.write_text(LEGACY_CONF)
    config = QcnlConfig.load(path)
    assert config.pccs_url == "https://localhost:8081/sgx/certification/v3/"
    assert config.use_secure_cert is False
    assert config.collateral_service is None
    assert config.collateral_url == config.pccs_url


def test_qcnl_first_release_key_name() -> None:
    config = QcnlConfig.parse("PCS_URL=https://h:8081/sgx/certification/v1/\nUSE_SECURE_CERT=TRUE")
    assert config.pccs_url == "https://h:8081/sgx/certification/v1/" and config.use_secure_cert


def test_qcnl_json_format(tmp_path: Path) -> None:
    path = tmp_path / "sgx_default_qcnl.conf"
    path.write_text(JSON_CONF)
    config = QcnlConfig.load(path)
    assert config.pccs_url == "https://pccs.example:8081/sgx/certification/v4/"
    assert config.use_secure_cert is False


def test_qcnl_json_first_entry_commented_out_and_collateral_service() -> None:
    text = (
        '{\n  //"pccs_url": "https://a/sgx/certification/v4/"\n'
        '  ,"collateral_service": "https://api.trustedservices.intel.com/sgx/certification/v4/",\n}'
    )
    config = QcnlConfig.parse(text)
    assert config.pccs_url is None and config.use_secure_cert is True
    assert config.collateral_url.startswith("https://api.trustedservices.intel.com/")


def test_qcnl_defaults_to_secure() -> None:
    assert QcnlConfig.parse('{"pccs_url": "https://p/"}').use_secure_cert is True
    assert QcnlConfig.parse("PCCS_URL=https://p/").use_secure_cert is True


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("PCCS_URL=https://p/\nUSE_SECURE_CERT=maybe\n", "line 2: USE_SECURE_CERT: expected TRUE"),
        ("PCCS_URL=localhost:8081\n", "line 1: PCCS_URL: 'localhost:8081' is not an http"),
        ("just some words\n", "line 1: expected KEY=VALUE"),
        ('{"pccs_url": "https://p/", "use_secure_cert": "no"}', "use_secure_cert: expected true"),
        ('{"pccs_url": 8081}', "pccs_url: expected a string"),
        ('{"pccs_url": "https://p/" "x": 1}', "invalid JSON at line 1"),
    ],
)
def test_qcnl_errors_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "qcnl.conf"
    path.write_text(text)
    with pytest.raises(CollateralError) as exc:
        QcnlConfig.load(path)
    message = _one_line(exc)
    assert message.startswith(f"{path}: ") and expected in message


def test_qcnl_missing_file_and_missing_url(tmp_path: Path) -> None:
    with pytest.raises(CollateralError) as exc:
        QcnlConfig.load(tmp_path / "nope.conf")
    assert "nope.conf: cannot read" in _one_line(exc)
    with pytest.raises(CollateralError) as exc:
        _ = QcnlConfig.parse("USE_SECURE_CERT=FALSE", source="q.conf").collateral_url
    assert "q.conf: no PCCS_URL" in _one_line(exc)


def test_pccs_settings(tmp_path: Path) -> None:
    conf = tmp_path / "q.conf"
    conf.write_text("PCCS_URL=https://from-file:8081/sgx/certification/v4/\nUSE_SECURE_CERT=FALSE")
    assert pccs_settings(None, conf).url.startswith("https://from-file")
    assert pccs_settings(None, conf).verify_tls is False
    assert pccs_settings(None, conf, verify_tls=True).verify_tls is True
    # An explicit URL keeps TLS verification on unless told otherwise.
    assert pccs_settings("https://cli:8081/", None) == collateral_mod.PccsSettings(
        "https://cli:8081/", True
    )
    assert pccs_settings("https://cli:8081/", conf).verify_tls is False
    assert pccs_settings("https://cli:8081/", None, verify_tls=False).verify_tls is False


def test_pccs_settings_without_default_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(collateral_mod, "DEFAULT_QCNL_PATH", tmp_path / "absent.conf")
    with pytest.raises(CollateralError) as exc:
        pccs_settings(None, None)
    assert "pass --pccs-url or set PCCS_URL" in _one_line(exc)


# --- collateral files ------------------------------------------------------------------


def test_load_collateral_file(tmp_path: Path) -> None:
    path = VECTORS / "sgx_quote_collateral.json"
    assert load_collateral_file(path) == path.read_text()
    cases = {
        "missing.json": None,
        "notjson.json": b"{oops",
        "binary.json": b"\xff\xfe\x00",
        "partial.json": json.dumps({"pck_crl": "00"}).encode(),
        "array.json": b"[]",
    }
    expected = {
        "missing.json": "cannot read",
        "notjson.json": "invalid JSON at line 1",
        "binary.json": "not UTF-8",
        "partial.json": "collateral",
        "array.json": "collateral",
    }
    for name, content in cases.items():
        target = tmp_path / name
        if content is not None:
            target.write_bytes(content)
        with pytest.raises(CollateralError) as exc:
            load_collateral_file(target)
        message = _one_line(exc)
        assert message.startswith(str(target)) and expected[name] in message
