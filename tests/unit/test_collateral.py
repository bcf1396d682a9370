"""Collateral: the PCCS client against a fake PCCS on loopback, the cache, rollback refusal,
QCNL configuration and collateral files."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from teepsi.attestation.collateral import (
    CollateralCache,
    CollateralError,
    CollateralFreshness,
    CollateralRollbackError,
    QcnlConfig,
    describe_collateral,
    fetch_collateral,
    load_collateral_file,
    pccs_settings,
)
from teepsi.attestation.collateral import qcnl as qcnl_mod
from teepsi.attestation.collateral import sources as sources_mod
from teepsi.attestation.evidence import Role
from teepsi.attestation.measure import sim_identity
from teepsi.attestation.sim import SimPlatform, SimPlatformConfig
from teepsi.attestation.trust import verify_trusted_quote
from teepsi.timefmt import iso_utc

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


@pytest.mark.parametrize("url", ["ftp://pccs:8081/", "pccs:8081", "", "https:///sgx/"])
def test_bad_pccs_url(url: str) -> None:
    _, quote = _sim()
    with pytest.raises(CollateralError) as exc:
        fetch_collateral(quote, url)
    assert "not an http:// or https:// URL" in _one_line(exc)


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


def test_cache_refuses_collateral_that_does_not_verify_the_quote() -> None:
    _, quote = _sim()
    _, intel = _vector("sgx_quote")
    cache = CollateralCache(clock=Clock(PINNED))
    with pytest.raises(CollateralError) as exc:
        cache.get(quote, lambda q: intel, validate=sources_mod._check_own_quote)
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


# --- rollback refusal ------------------------------------------------------------------


SOURCE = "ppid:00112233445566778899aabbccddeeff"


def test_rollback_refused() -> None:
    t0 = int(time.time()) - 10 * DAY
    old, new = _sim_collateral(t0), _sim_collateral(t0 + 5 * DAY)
    freshness = CollateralFreshness()
    freshness.check_and_record(old, source=SOURCE)
    freshness.check_and_record(new, source=SOURCE)
    freshness.check_and_record(new, source=SOURCE)  # the same collateral again is fine
    with pytest.raises(CollateralRollbackError) as exc:
        freshness.check_and_record(old, source=SOURCE)
    text = _one_line(exc)
    assert text.startswith(f"collateral issued {iso_utc(t0)} is older than ")
    assert f"this platform showed before ({iso_utc(t0 + 5 * DAY)})" in text
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
    freshness.check_and_record(_sim_collateral(t0 + DAY), source=SOURCE)
    freshness.check_and_record(
        _sim_collateral(t0 + 1), source=SOURCE
    )  # a day older than seen: tolerated
    with pytest.raises(CollateralRollbackError):
        freshness.check_and_record(_sim_collateral(t0 - 1), source=SOURCE)
    with pytest.raises(CollateralRollbackError) as exc:
        freshness.check_and_record(
            _with_evaluation_number(_sim_collateral(t0 + DAY), 16), source=SOURCE
        )
    assert "TCB evaluation data number 16, lower than 17" in _one_line(exc)
    freshness.check_and_record(
        _with_evaluation_number(_sim_collateral(t0 + DAY), 18), source=SOURCE
    )
    with pytest.raises(CollateralRollbackError):
        freshness.check_and_record(_sim_collateral(t0 + DAY), source=SOURCE)  # back to 17


def test_check_does_not_record() -> None:
    t0 = int(time.time()) - 10 * DAY
    freshness = CollateralFreshness()
    info = freshness.check(_sim_collateral(t0 + DAY), source=SOURCE)
    assert info.items and all(freshness.newest(i.key, source=SOURCE) is None for i in info.items)
    freshness.check_and_record(_sim_collateral(t0), source=SOURCE)  # check() recorded nothing
    assert all(freshness.newest(i.key, source=SOURCE) == t0 for i in info.items)
    # what check_and_record() recorded, check() enforces: it is a check, just not a recording one
    with pytest.raises(CollateralRollbackError):
        freshness.check(_sim_collateral(t0 - DAY), source=SOURCE)
    assert all(freshness.newest(i.key, source=SOURCE) == t0 for i in info.items)


def test_rollback_state_persists(tmp_path: Path) -> None:
    t0 = int(time.time()) - 10 * DAY
    state = tmp_path / "collateral-state.json"
    CollateralFreshness(state).check_and_record(_sim_collateral(t0 + DAY), source=SOURCE)
    assert json.loads(state.read_text())["version"] == 2
    with pytest.raises(CollateralRollbackError):
        CollateralFreshness(state).check_and_record(_sim_collateral(t0), source=SOURCE)
    state.write_text("{not json")
    with pytest.raises(CollateralError) as exc:
        CollateralFreshness(state)
    assert str(state) in _one_line(exc)


def test_rollback_state_is_per_trust_root() -> None:
    """Simulated collateral dated now must not make Intel's real collateral look old."""
    freshness = CollateralFreshness()
    simulated = freshness.check_and_record(_sim_collateral(int(time.time()) - 600), source=SOURCE)
    _, intel_json = _vector("sgx_quote")
    intel = freshness.check_and_record(intel_json, source=SOURCE)
    # the same documents (TCB info, QE identity, CRLs) under two roots: tracked apart
    assert {i.kind for i in intel.items} == {i.kind for i in simulated.items}
    assert not {i.key for i in intel.items} & {i.key for i in simulated.items}
    # Intel's is older, so under one shared key observing it would have been a rollback
    assert intel.oldest_issued < simulated.oldest_issued
    for item in (*simulated.items, *intel.items):
        assert freshness.newest(item.key, source=SOURCE) == item.issued


def test_rollback_refusal_in_the_verification_path() -> None:
    """The one path records after acceptance and refuses older collateral afterwards."""
    from teepsi.attestation.peer import PeerRejected, PeerVerifier

    t0 = int(time.time()) - 10 * DAY
    platform_new, quote = _sim(t0 + 5 * DAY)
    verifier = PeerVerifier(None, allow_simulated=True)
    new = platform_new.collateral_json()
    verifier.verify_bound_quote(quote, new, quote[368:432], what="peer", role=None)
    old = _sim_collateral(t0)
    verify_trusted_quote(
        quote, old, allow_simulated=True, now=t0 + 60
    )  # a host with its clock rolled back
    with pytest.raises(PeerRejected, match="refusing a possible rollback"):
        verifier.verify_bound_quote(quote, old, quote[368:432], what="peer", role=None, at=t0 + 60)


def test_describe_collateral_on_vector() -> None:
    _, text = _vector("sgx_quote")
    info = describe_collateral(text)
    assert info.fmspc == "00A067110000" and info.tee_type == "SGX"
    kinds = [item.kind for item in info.items]
    assert kinds == ["TCB info", "QE identity", "PCK CRL", "root CA CRL"]
    assert iso_utc(info.items[0].issued) == "2025-06-19T10:56:11Z"
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
    assert pccs_settings("https://cli:8081/", None) == qcnl_mod.PccsSettings(
        "https://cli:8081/", True
    )
    assert pccs_settings("https://cli:8081/", conf).verify_tls is False
    assert pccs_settings("https://cli:8081/", None, verify_tls=False).verify_tls is False


def test_pccs_settings_without_default_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(qcnl_mod, "DEFAULT_QCNL_PATH", tmp_path / "absent.conf")
    with pytest.raises(CollateralError) as exc:
        pccs_settings(None, None)
    assert "no PCCS URL: set PCCS_URL in" in _one_line(exc)
    assert isinstance(exc.value, qcnl_mod.PccsUrlMissing)  # the CLI adds "pass --pccs-url"


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
