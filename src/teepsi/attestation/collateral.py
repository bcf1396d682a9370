"""Quote collateral: fetching it from a PCCS, caching it, loading it, refusing rollbacks.

Verification (:mod:`teepsi.attestation.verify`) never touches the network; everything
that does lives here. Collateral is the set of Intel-signed documents a DCAP quote is
checked against: TCB info (per FMSPC), QE identity, the PCK CRL and the root CA CRL,
with their issuer chains. Everything in it is signed under Intel's root, so relaying it
through an untrusted host or an unauthenticated PCCS connection is safe; what such a
relay *can* do is replay older, genuine collateral, which is what
:class:`CollateralFreshness` refuses.

The PCCS client speaks the Intel PCS / PCCS API, versions 3 and 4:

* ``GET {base}/pckcrl?ca=processor|platform``: the PCK CRL (DER, PEM or hex text),
  issuer chain in the ``SGX-PCK-CRL-Issuer-Chain`` header;
* ``GET {base}/tcb?fmspc=…``: ``{"tcbInfo": {…}, "signature": "<hex>"}``, issuer chain
  in ``TCB-Info-Issuer-Chain`` (v4) or ``SGX-TCB-Info-Issuer-Chain`` (v3);
* ``GET {base}/qe/identity``: ``{"enclaveIdentity": {…}, "signature": "<hex>"}``,
  issuer chain in ``SGX-Enclave-Identity-Issuer-Chain``;
* ``GET {base}/rootcacrl`` (PCCS only): the root CA CRL; when a server does not have it
  (Intel's PCS), the CRL distribution point named in the root certificate is used.

``base`` is ``…/sgx/certification/vN``; TDX quotes take TCB info and QE identity from
``…/tdx/certification/v4``. Issuer chains are URL-encoded PEM. The result is collateral
in dcap-qvl's JSON form (``QuoteCollateralV3.to_json()``).

We do not use ``dcap_qvl.get_collateral``: in dcap-qvl 0.7.0 it always verifies the
PCCS's TLS certificate (so ``USE_SECURE_CERT=FALSE`` for a self-signed PCCS cannot be
honoured), rewrites every URL to API v4 (a ``…/v3/`` PCCS URL from an older QCNL file
breaks) and cannot read the hex-encoded CRLs of the PCCS 3.0 API.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPMessage
from pathlib import Path
from typing import IO, Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teepsi import __version__
from teepsi.jsontext import read_user_text
from teepsi.privatefile import write_private

__all__ = [
    "DEFAULT_QCNL_PATH",
    "FRESHNESS_TOLERANCE_SECONDS",
    "CacheStats",
    "CollateralCache",
    "CollateralError",
    "CollateralFreshness",
    "CollateralInfo",
    "CollateralItem",
    "CollateralRollbackError",
    "PccsClient",
    "PccsSettings",
    "QcnlConfig",
    "QuotePlatform",
    "collateral_for_quote",
    "default_state_path",
    "describe_collateral",
    "fetch_collateral",
    "iso_utc",
    "load_collateral_file",
    "pccs_settings",
    "quote_platform",
]

log = logging.getLogger(__name__)

DEFAULT_QCNL_PATH = Path("/etc/sgx_default_qcnl.conf")
DEFAULT_TIMEOUT_SECONDS = 30.0
#: Largest PCCS response read; Intel's biggest documents (platform CA CRLs) are far smaller.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024

#: The keys of dcap-qvl's collateral JSON, in its order.
COLLATERAL_KEYS = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)


class CollateralError(Exception):
    """Collateral could not be fetched, read or accepted; the message is one line."""


class CollateralRollbackError(CollateralError):
    """Collateral is older than collateral already seen: a possible rollback."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def iso_utc(ts: int) -> str:
    """UNIX seconds as ISO 8601 UTC, e.g. ``2026-04-03T11:15:17Z``."""
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(value: object, where: str) -> int:
    if not isinstance(value, str):
        raise CollateralError(f"{where}: expected an ISO 8601 date, got {value!r}")
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise CollateralError(f"{where}: expected an ISO 8601 date, got {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)  # Intel's dates are UTC ("…Z")
    return int(parsed.timestamp())


# --- QCNL configuration ---------------------------------------------------------------


def _strip_json_comments(text: str) -> str:
    """Drop // and /* */ comments outside strings (URLs in strings contain "//")."""
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_string = False
            i += 1
        elif ch == '"':
            in_string = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
            out.append(" ")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _drop_stray_commas(text: str) -> str:
    """Remove commas JSON does not allow: leading (``{ ,"a"``), doubled or trailing.

    Intel's files put the comma at the start of each entry, so commenting out the first
    entry leaves ``{ ,"next": …``; the QCNL's own parser is lenient about this too.
    """
    out: list[str] = []
    in_string = False
    escaped = False
    last = ""  # last significant character outside strings
    for ch in text:
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                last = '"'
            continue
        if ch == '"':
            in_string = True
        elif ch == "," and last in ("{", "[", ","):
            continue
        elif ch in "}]" and last == ",":
            # remove the trailing comma already written
            for j in range(len(out) - 1, -1, -1):
                if out[j] == ",":
                    del out[j]
                    break
        if not ch.isspace():
            last = ch
        out.append(ch)
    return "".join(out)


def _check_url(url: str, where: str) -> str:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CollateralError(f"{where}: {url!r} is not an http:// or https:// URL")
    return url.strip()


@dataclass(frozen=True)
class QcnlConfig:
    """What teepsi reads from Intel's QCNL configuration (``sgx_default_qcnl.conf``).

    Two formats exist: older files are ``KEY=VALUE`` lines (``PCCS_URL=…``,
    ``USE_SECURE_CERT=TRUE|FALSE``, ``#`` comments); newer ones are JSON with
    ``//`` comments (``"pccs_url"``, ``"use_secure_cert"``, ``"collateral_service"``).
    Keys teepsi does not use (retries, local caches, …) are ignored.
    """

    pccs_url: str | None
    #: False means: do not verify the PCCS's TLS certificate (self-signed PCCS).
    use_secure_cert: bool = True
    #: Where QCNL takes verification collateral from, when not from ``pccs_url``.
    collateral_service: str | None = None
    pccs_api_version: str | None = None
    source: str = str(DEFAULT_QCNL_PATH)

    @property
    def collateral_url(self) -> str:
        """The URL verification collateral comes from, as QCNL chooses it."""
        url = self.collateral_service or self.pccs_url
        if not url:
            raise CollateralError(
                f"{self.source}: no PCCS_URL (pccs_url) set: cannot fetch collateral"
            )
        return url

    @classmethod
    def load(cls, path: str | Path = DEFAULT_QCNL_PATH) -> QcnlConfig:
        """Read a QCNL file; every failure is a one-line CollateralError naming ``path``."""
        where = str(path)
        text = read_user_text(path, lambda problem: CollateralError(f"{where}: {problem}"))
        return cls.parse(text, source=where)

    @classmethod
    def parse(cls, text: str, *, source: str = "qcnl config") -> QcnlConfig:
        if _strip_json_comments(text).lstrip().startswith("{"):
            return cls._parse_json(text, source)
        return cls._parse_lines(text, source)

    @classmethod
    def _parse_json(cls, text: str, source: str) -> QcnlConfig:
        cleaned = _drop_stray_commas(_strip_json_comments(text))
        try:
            data = json.loads(cleaned)
        except json.JSONDecodeError as exc:
            raise CollateralError(
                f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(data, dict):
            raise CollateralError(f"{source}: expected a JSON object")

        def text_value(key: str) -> str | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, str):
                raise CollateralError(f"{source}: {key}: expected a string, got {value!r}")
            return _check_url(value, f"{source}: {key}") if key != "pccs_api_version" else value

        secure = data.get("use_secure_cert", True)
        if not isinstance(secure, bool):
            raise CollateralError(
                f"{source}: use_secure_cert: expected true or false, got {secure!r}"
            )
        return cls(
            pccs_url=text_value("pccs_url"),
            use_secure_cert=secure,
            collateral_service=text_value("collateral_service"),
            pccs_api_version=text_value("pccs_api_version"),
            source=source,
        )

    @classmethod
    def _parse_lines(cls, text: str, source: str) -> QcnlConfig:
        values: dict[str, tuple[int, str]] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith(("#", ";")):
                continue
            key, sep, value = stripped.partition("=")
            if not sep or not key.strip():
                raise CollateralError(
                    f"{source}: line {number}: expected KEY=VALUE or a JSON object, "
                    f"got {stripped[:40]!r}"
                )
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
                value = value[1:-1]
            values[key.strip().upper()] = (number, value)

        def url(key: str) -> str | None:
            if key not in values or not values[key][1]:
                return None
            number, value = values[key]
            return _check_url(value, f"{source}: line {number}: {key}")

        secure = True
        if "USE_SECURE_CERT" in values:
            number, value = values["USE_SECURE_CERT"]
            if value.upper() not in ("TRUE", "FALSE"):
                raise CollateralError(
                    f"{source}: line {number}: USE_SECURE_CERT: expected TRUE or FALSE, "
                    f"got {value!r}"
                )
            secure = value.upper() == "TRUE"
        return cls(
            # The very first QCNL releases called the key PCS_URL.
            pccs_url=url("PCCS_URL") or url("PCS_URL"),
            use_secure_cert=secure,
            collateral_service=url("COLLATERAL_SERVICE"),
            pccs_api_version=values.get("PCCS_API_VERSION", (0, ""))[1] or None,
            source=source,
        )


@dataclass(frozen=True)
class PccsSettings:
    url: str
    verify_tls: bool = True


def pccs_settings(
    pccs_url: str | None = None,
    qcnl_path: str | Path | None = None,
    *,
    verify_tls: bool | None = None,
) -> PccsSettings:
    """Where to fetch collateral from, and whether to check the PCCS's TLS certificate.

    The URL is ``pccs_url`` when given, else the QCNL file's (``qcnl_path``, default
    ``/etc/sgx_default_qcnl.conf``). TLS verification: ``verify_tls`` when given; else the
    QCNL file's ``USE_SECURE_CERT`` when the URL or the file came from it; else on.
    """
    if pccs_url:
        url = _check_url(pccs_url, "PCCS URL")
        if verify_tls is None and qcnl_path is not None:
            verify_tls = QcnlConfig.load(qcnl_path).use_secure_cert
        return PccsSettings(url, True if verify_tls is None else verify_tls)
    path = Path(qcnl_path) if qcnl_path is not None else DEFAULT_QCNL_PATH
    if qcnl_path is None and not path.exists():
        raise CollateralError(
            f"no PCCS URL: pass --pccs-url or set PCCS_URL in {path} (file not found)"
        )
    config = QcnlConfig.load(path)
    return PccsSettings(
        config.collateral_url, config.use_secure_cert if verify_tls is None else verify_tls
    )


# --- reading collateral ----------------------------------------------------------------


@dataclass(frozen=True)
class CollateralItem:
    """One dated document of a collateral set."""

    #: "TCB info", "QE identity", "PCK CRL" or "root CA CRL".
    kind: str
    #: Human label, e.g. "TCB info SGX for FMSPC 00A067110000".
    label: str
    #: Identity for rollback tracking: the same document over time has the same key.
    key: str
    #: issueDate (TCB info, QE identity) or thisUpdate (CRLs), UNIX seconds.
    issued: int
    #: nextUpdate, UNIX seconds.
    next_update: int
    #: tcbEvaluationDataNumber (TCB info, QE identity): Intel raises it whenever the
    #: content changes, e.g. at a TCB recovery; None for CRLs.
    evaluation_number: int | None = None


@dataclass(frozen=True)
class CollateralInfo:
    """The dates and identities in a collateral set (nothing here is verified)."""

    tee_type: str
    fmspc: str
    items: tuple[CollateralItem, ...]

    @property
    def next_update(self) -> int:
        """The earliest nextUpdate: collateral is usable until then."""
        return min(item.next_update for item in self.items)

    @property
    def oldest_issued(self) -> int:
        """The earliest issueDate / thisUpdate: how old the collateral set is."""
        return min(item.issued for item in self.items)

    def expired(self, now: int) -> list[CollateralItem]:
        return [item for item in self.items if item.next_update < now]

    def not_yet_valid(self, now: int) -> list[CollateralItem]:
        return [item for item in self.items if item.issued > now]

    def describe_expired(self, now: int) -> str:
        """``"root CA CRL … expired 2026-04-03T11:15:17Z; …"`` or "" when nothing expired."""
        parts = [f"{i.label} expired {iso_utc(i.next_update)}" for i in self.expired(now)]
        parts += [f"{i.label} is issued only {iso_utc(i.issued)}" for i in self.not_yet_valid(now)]
        return "; ".join(parts)


def _root_scope(chain_pem: str, where: str) -> str:
    """A short fingerprint of a chain's root, so rollback state is kept per trust root.

    The simulated PKI imitates Intel's names; keying on names alone would let simulated
    collateral (dated "now") shadow real Intel collateral.
    """
    try:
        certs = x509.load_pem_x509_certificates(chain_pem.encode())
    except ValueError:
        raise CollateralError(f"collateral: {where}: not a PEM certificate chain") from None
    root = certs[-1].public_bytes(serialization.Encoding.DER)
    return hashlib.sha256(root).hexdigest()[:16]


def _crl_item(der: bytes, kind: str, scope: str) -> CollateralItem:
    try:
        crl = x509.load_der_x509_crl(der)
    except ValueError:
        raise CollateralError(f"collateral: {kind}: not a DER CRL") from None
    if crl.next_update_utc is None:
        raise CollateralError(f"collateral: {kind}: has no nextUpdate")
    issuer = crl.issuer.rfc4514_string()
    common_names = crl.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    shown = str(common_names[0].value) if common_names else issuer
    return CollateralItem(
        kind=kind,
        label=f"{kind} ({shown})",
        key=f"{scope}/crl/{issuer}",
        issued=int(crl.last_update_utc.timestamp()),
        next_update=int(crl.next_update_utc.timestamp()),
    )


def _evaluation_number(document: dict[str, Any], where: str) -> int | None:
    value = document.get("tcbEvaluationDataNumber")
    if value is None:
        return None
    if type(value) is not int or value < 0:
        raise CollateralError(f"{where}: expected a non-negative integer, got {value!r}")
    return value


def _collateral_doc(collateral_json: str) -> dict[str, Any]:
    try:
        doc = json.loads(collateral_json)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise CollateralError(f"collateral is not JSON: {_one_line(exc)}") from None
    if not isinstance(doc, dict):
        raise CollateralError("collateral is not a JSON object")
    missing = [key for key in COLLATERAL_KEYS if not isinstance(doc.get(key), str)]
    if missing:
        raise CollateralError(f"collateral lacks {', '.join(missing)} (dcap-qvl JSON form)")
    return doc


def describe_collateral(collateral_json: str) -> CollateralInfo:
    """Read the dates and identities out of collateral in dcap-qvl's JSON form."""
    doc = _collateral_doc(collateral_json)
    try:
        tcb_info = json.loads(doc["tcb_info"])
        qe_identity = json.loads(doc["qe_identity"])
    except (json.JSONDecodeError, RecursionError):
        raise CollateralError("collateral: tcb_info or qe_identity is not JSON") from None
    if not isinstance(tcb_info, dict) or not isinstance(qe_identity, dict):
        raise CollateralError("collateral: tcb_info and qe_identity must be JSON objects")
    tcb_scope = _root_scope(doc["tcb_info_issuer_chain"], "tcb_info_issuer_chain")
    qe_scope = _root_scope(doc["qe_identity_issuer_chain"], "qe_identity_issuer_chain")
    crl_scope = _root_scope(doc["pck_crl_issuer_chain"], "pck_crl_issuer_chain")
    tcb_id = str(tcb_info.get("id", "SGX"))  # TCB info v2 has no id: it is always SGX
    fmspc = str(tcb_info.get("fmspc", "")).upper()
    qe_id = str(qe_identity.get("id", "QE"))
    items = [
        CollateralItem(
            kind="TCB info",
            label=f"TCB info ({tcb_id}, FMSPC {fmspc})",
            key=f"{tcb_scope}/tcb_info/{tcb_id}/{fmspc}",
            issued=_parse_time(tcb_info.get("issueDate"), "collateral: tcb_info.issueDate"),
            next_update=_parse_time(tcb_info.get("nextUpdate"), "collateral: tcb_info.nextUpdate"),
            evaluation_number=_evaluation_number(
                tcb_info, "collateral: tcb_info.tcbEvaluationDataNumber"
            ),
        ),
        CollateralItem(
            kind="QE identity",
            label=f"QE identity ({qe_id})",
            key=f"{qe_scope}/qe_identity/{qe_id}",
            issued=_parse_time(qe_identity.get("issueDate"), "collateral: qe_identity.issueDate"),
            next_update=_parse_time(
                qe_identity.get("nextUpdate"), "collateral: qe_identity.nextUpdate"
            ),
            evaluation_number=_evaluation_number(
                qe_identity, "collateral: qe_identity.tcbEvaluationDataNumber"
            ),
        ),
    ]
    for key, kind in (("pck_crl", "PCK CRL"), ("root_ca_crl", "root CA CRL")):
        try:
            der = bytes.fromhex(doc[key])
        except ValueError:
            raise CollateralError(f"collateral: {key}: not hex") from None
        items.append(_crl_item(der, kind, crl_scope))
    return CollateralInfo(tee_type=tcb_id, fmspc=fmspc, items=tuple(items))


def _validate_collateral(collateral_json: str, where: str) -> None:
    """Refuse what dcap-qvl would not load, with a one-line reason."""
    try:
        dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"{where}: not dcap-qvl collateral: {_one_line(exc)}") from None
    try:
        describe_collateral(collateral_json)
    except CollateralError as exc:
        raise CollateralError(f"{where}: {exc}") from None


def load_collateral_file(path: str | Path) -> str:
    """Read a collateral file (dcap-qvl's JSON form); errors are one line naming ``path``."""
    where = str(path)
    text = read_user_text(path, lambda problem: CollateralError(f"{where}: {problem}"))
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollateralError(
            f"{where}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise CollateralError(f"{where}: invalid JSON: nested too deeply") from None
    _validate_collateral(text, where)
    return text


# --- rollback refusal ------------------------------------------------------------------


_EVALUATION_SUFFIX = "#tcbEvaluationDataNumber"

#: How much older than the newest seen from the same source collateral may be: one
#: platform's collateral may reach a verifier through several PCCS caches (e.g. two
#: server processes on one machine refreshing on different days). Evaluation numbers
#: never go back, whatever the tolerance.
FRESHNESS_TOLERANCE_SECONDS = 24 * 3600


def default_state_path(role: str) -> Path:
    """Where the CLI keeps ``role``'s rollback state unless told otherwise.

    ``$XDG_STATE_HOME/teepsi/ROLE-collateral-state.json`` (``~/.local/state`` when unset).
    """
    base = os.environ.get("XDG_STATE_HOME")
    try:
        root = Path(base) if base else Path.home() / ".local" / "state"
    except RuntimeError:
        raise CollateralError(
            "cannot tell where to keep collateral state (no HOME); pass --collateral-state FILE"
        ) from None
    return root / "teepsi" / f"{role}-collateral-state.json"


class CollateralFreshness:
    """Remembers the newest collateral each source has shown and refuses anything older.

    A *source* is the attesting platform, named by the PPID of its verified PCK
    certificate. Per source and document identity (TCB info per FMSPC, QE identity,
    each CRL issuer, all under their trust root) it keeps the newest issueDate /
    thisUpdate and, for TCB info and QE identity, the highest tcbEvaluationDataNumber.
    Collateral older, or with a lower number, than its source showed before is refused:
    a host that rolls the clock back and replays old, genuine collateral must not
    revive a TCB level or a certificate revoked since.

    Why per source: a peer's collateral must never raise the floor for other peers,
    or one party (or a refused caller) could lock out every honest party whose PCCS
    lags. The floor across all peers is the policy's (``min_tcb_evaluation_data_number``,
    ``max_collateral_age_days``), set by whoever owns the policy.

    Call :meth:`observe` only for a peer that was fully accepted (quote, binding, role,
    policy): recording anything earlier lets a refused caller poison the state.

    With ``state_path`` the state survives restarts: a small JSON file (mode 0600,
    written atomically), re-read and merged under a lock before each update, so
    processes sharing it never forget what another recorded. Thread-safe.
    """

    _STATE_VERSION = 2

    def __init__(self, state_path: str | Path | None = None, *, tolerance_seconds: int = 0) -> None:
        if tolerance_seconds < 0:
            raise ValueError("tolerance_seconds must not be negative")
        self.tolerance_seconds = tolerance_seconds
        self.state_path = Path(state_path) if state_path is not None else None
        self._lock = threading.Lock()
        self._newest: dict[str, int] = {}
        if self.state_path is not None:
            self._newest = self._load(self.state_path)

    @classmethod
    def _load(cls, path: Path) -> dict[str, int]:
        try:
            raw = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CollateralError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise CollateralError(f"{path}: collateral state is not UTF-8") from None
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CollateralError(f"{path}: collateral state is not JSON: {exc.msg}") from None
        newest = data.get("newest") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or data.get("version") != cls._STATE_VERSION
            or not isinstance(newest, dict)
            or not all(isinstance(k, str) and type(v) is int for k, v in newest.items())
        ):
            # Fail closed: silently starting afresh would forget what was seen.
            raise CollateralError(
                f"{path}: not a teepsi collateral state file (version {cls._STATE_VERSION}); "
                "remove it only if you trust the collateral you will see next"
            )
        return dict(newest)

    def _merge(self, other: dict[str, int]) -> None:
        for key, value in other.items():
            if value > self._newest.get(key, -1):
                self._newest[key] = value

    def _save(self) -> None:
        assert self.state_path is not None
        data = {"version": self._STATE_VERSION, "newest": dict(sorted(self._newest.items()))}
        try:
            write_private(self.state_path, (json.dumps(data, indent=1) + "\n").encode())
        except OSError as exc:
            raise CollateralError(
                f"{self.state_path}: cannot write collateral state: {exc.strerror or exc}"
            ) from None

    def _file_lock(self) -> int | None:
        """An exclusive lock on ``STATE.lock`` (None where the OS has no flock)."""
        assert self.state_path is not None
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise CollateralError(
                f"{lock_path}: cannot open the collateral state lock: {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise CollateralError(f"{lock_path}: cannot lock: {exc.strerror}") from None
        return fd

    @staticmethod
    def _key(source: str, item: CollateralItem) -> str:
        if not source or not source.isprintable() or "|" in source:
            raise CollateralError("collateral source must be a non-empty name without '|'")
        return f"{source}|{item.key}"

    def newest(self, key: str, *, source: str) -> int | None:
        """The newest issue date ``source`` showed for a document identity (UNIX seconds)."""
        with self._lock:
            return self._newest.get(f"{source}|{key}")

    def _check_locked(self, info: CollateralInfo, source: str) -> None:
        for item in info.items:
            key = self._key(source, item)
            seen = self._newest.get(key)
            if seen is not None and item.issued < seen - self.tolerance_seconds:
                raise CollateralRollbackError(
                    f"collateral issued {iso_utc(item.issued)} is older than collateral this "
                    f"platform showed before ({iso_utc(seen)}) for the {item.label}: refusing a "
                    "possible rollback"
                )
            highest = self._newest.get(key + _EVALUATION_SUFFIX)
            number = item.evaluation_number
            if highest is not None and number is not None and number < highest:
                raise CollateralRollbackError(
                    f"collateral has TCB evaluation data number {number}, lower than "
                    f"{highest} this platform showed before for the {item.label}: refusing a "
                    "possible rollback"
                )

    def check(self, collateral_json: str, *, source: str) -> CollateralInfo:
        """Raise CollateralRollbackError if any document is older than ``source`` showed.

        Records nothing.
        """
        info = describe_collateral(collateral_json)
        with self._lock:
            if self.state_path is not None:
                self._merge(self._load(self.state_path))
            self._check_locked(info, source)
        return info

    def observe(self, collateral_json: str, *, source: str) -> CollateralInfo:
        """Check (as :meth:`check`) and then remember this collateral's dates, atomically."""
        info = describe_collateral(collateral_json)
        self.record(info, source=source)
        return info

    def record(self, info: CollateralInfo, *, source: str) -> None:
        """:meth:`observe` for collateral already described (parsed once by the caller)."""
        with self._lock:
            lock_fd = self._file_lock() if self.state_path is not None else None
            try:
                if self.state_path is not None:
                    self._merge(self._load(self.state_path))
                self._check_locked(info, source)
                updates: dict[str, int] = {}
                for item in info.items:
                    key = self._key(source, item)
                    updates[key] = item.issued
                    if item.evaluation_number is not None:
                        updates[key + _EVALUATION_SUFFIX] = item.evaluation_number
                changed = any(value > self._newest.get(k, -1) for k, value in updates.items())
                self._merge(updates)
                if changed and self.state_path is not None:
                    self._save()
            finally:
                if lock_fd is not None:
                    os.close(lock_fd)


# --- the PCCS client -------------------------------------------------------------------


@dataclass(frozen=True)
class QuotePlatform:
    """Which collateral a quote needs: its TEE, its platform's FMSPC and its PCK CA."""

    tee_type: str  # "SGX" or "TDX"
    fmspc: str  # 12 upper-case hex digits
    ca: str  # "processor" or "platform"


def quote_platform(quote: bytes) -> QuotePlatform:
    """Read TEE type, FMSPC and PCK CA from the PCK certificate embedded in ``quote``."""
    try:
        parsed = dcap_qvl.parse_quote(bytes(quote))
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"quote cannot be parsed: {_one_line(exc)}") from None
    try:
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca())
    except (ValueError, TypeError) as exc:
        raise CollateralError(
            "quote does not carry its PCK certificate chain (FMSPC and CA unknown): "
            f"{_one_line(exc)}"
        ) from None
    if not re.fullmatch(r"[0-9A-F]{12}", fmspc) or ca not in ("processor", "platform"):
        raise CollateralError(f"quote has an unexpected FMSPC {fmspc!r} or CA {ca!r}")
    return QuotePlatform("TDX" if parsed.is_tdx() else "SGX", fmspc, ca)


def _is_loopback(host: str | None) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _crl_der(body: bytes, what: str) -> bytes:
    """A CRL as DER, whatever the PCCS sent: DER, PEM, or DER as hex text (PCCS API 3.0)."""
    data = body.strip()
    der: bytes | None = None
    if data.startswith(b"\x30"):
        der = bytes(body)
    elif data.startswith(b"-----BEGIN"):
        try:
            der = x509.load_pem_x509_crl(data).public_bytes(serialization.Encoding.DER)
        except ValueError:
            der = None
    elif re.fullmatch(rb"[0-9a-fA-F]+", data) and len(data) % 2 == 0:
        der = bytes.fromhex(data.decode("ascii"))
    if der is None:
        raise CollateralError(f"{what}: response is not a CRL (DER, PEM or hex)")
    try:
        x509.load_der_x509_crl(der)
    except ValueError:
        raise CollateralError(f"{what}: response is not a valid CRL") from None
    return der


def _raw_members(text: str, what: str) -> dict[str, str]:
    """The top-level members of a JSON object, values as their exact source text.

    Intel signs the bytes of ``tcbInfo`` / ``enclaveIdentity`` as they appear in the
    response; re-serialising them could change those bytes and break the signature.
    """
    decoder = json.JSONDecoder()
    members: dict[str, str] = {}

    def skip(pos: int) -> int:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        return pos

    try:
        pos = skip(0)
        if text[pos] != "{":
            raise ValueError("not an object")
        pos = skip(pos + 1)
        if text[pos] == "}":
            return members
        while True:
            if text[pos] != '"':
                raise ValueError("expected a key")
            key, pos = decoder.raw_decode(text, pos)
            pos = skip(pos)
            if text[pos] != ":":
                raise ValueError("expected ':'")
            pos = skip(pos + 1)
            _, end = decoder.raw_decode(text, pos)
            members[key] = text[pos:end]
            pos = skip(end)
            if text[pos] == ",":
                pos = skip(pos + 1)
                continue
            if text[pos] == "}":
                break
            raise ValueError("expected ',' or '}'")
    except (IndexError, ValueError, RecursionError) as exc:
        raise CollateralError(f"{what}: response is not a JSON object ({exc})") from None
    return members


@dataclass(frozen=True)
class _Response:
    headers: Message
    body: bytes


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (urllib would also follow ftp://)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            return None  # urllib then reports the redirect status as an HTTP error
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class PccsClient:
    """Fetches collateral for quotes from a PCCS (or Intel's PCS), API v3 or v4.

    ``verify_tls=False`` accepts any TLS certificate from the PCCS (QCNL's
    ``USE_SECURE_CERT=FALSE``, common for a self-signed PCCS). That is safe for
    integrity: every document is signed under Intel's root and checked by dcap-qvl.
    """

    def __init__(
        self,
        pccs_url: str,
        *,
        verify_tls: bool = True,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.url = _check_url(pccs_url, "PCCS URL")
        self.verify_tls = verify_tls
        self.timeout = timeout
        parts = urllib.parse.urlsplit(self.url)
        if parts.query or parts.fragment:
            raise CollateralError(f"PCCS URL: {pccs_url!r} must not have a query or fragment")
        path = parts.path.rstrip("/")
        match = re.search(r"/(sgx|tdx)/certification/(v[0-9]+)$", path)
        # A bare host means API v4, as Intel's PCS and current PCCS serve it.
        prefix, self.api_version = (
            (path[: match.start()], match.group(2)) if match else (path, "v4")
        )
        self._origin = f"{parts.scheme}://{parts.netloc}{prefix}"
        context = ssl.create_default_context()
        if not verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=context),
            _HttpRedirectsOnly(),
        ]
        if _is_loopback(parts.hostname):
            # A PCCS on this machine must not be sent through an HTTP proxy from the env.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def _base(self, tee: str) -> str:
        return f"{self._origin}/{tee}/certification/{self.api_version}"

    def _get(self, url: str, what: str) -> _Response:
        _check_url(url, what)  # http(s) only: never file: or other schemes
        request = urllib.request.Request(  # noqa: S310 - scheme checked above
            url, headers={"User-Agent": f"teepsi/{__version__}"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                body = response.read(MAX_RESPONSE_BYTES + 1)
                headers = response.headers
        except urllib.error.HTTPError as exc:
            exc.close()
            raise CollateralError(
                f"PCCS refused {what} ({url}): HTTP {exc.code} {_one_line(exc.reason)}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            hint = ""
            if isinstance(reason, ssl.SSLCertVerificationError):
                hint = (
                    " (a self-signed PCCS needs USE_SECURE_CERT=FALSE in the QCNL config "
                    "or --insecure-pccs-tls)"
                )
            detail = getattr(reason, "strerror", None) or reason
            raise CollateralError(
                f"cannot reach PCCS for {what} ({url}): {_one_line(detail)}{hint}"
            ) from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise CollateralError(
                f"cannot reach PCCS for {what} ({url}): {_one_line(exc) or type(exc).__name__}"
            ) from None
        if len(body) > MAX_RESPONSE_BYTES:
            raise CollateralError(f"PCCS answer for {what} ({url}) is larger than allowed")
        return _Response(headers=headers, body=body)

    @staticmethod
    def _chain(response: _Response, names: Iterable[str], what: str) -> str:
        for name in names:
            value = response.headers.get(name)
            if value:
                pem = urllib.parse.unquote(value)
                try:
                    x509.load_pem_x509_certificates(pem.encode())
                except ValueError:
                    raise CollateralError(
                        f"{what}: header {name} is not a PEM certificate chain"
                    ) from None
                return pem
        raise CollateralError(f"{what}: response lacks the {' or '.join(names)} header")

    @staticmethod
    def _signed_document(response: _Response, keys: Iterable[str], what: str) -> tuple[str, str]:
        try:
            text = response.body.decode("utf-8")
        except UnicodeDecodeError:
            raise CollateralError(f"{what}: response is not UTF-8 JSON") from None
        members = _raw_members(text, what)
        body = next((members[key] for key in keys if key in members), None)
        if body is None or not body.startswith("{"):
            raise CollateralError(f"{what}: response lacks {' or '.join(keys)}")
        try:
            signature = json.loads(members.get("signature", "null"))
        except json.JSONDecodeError:
            signature = None
        if not isinstance(signature, str) or not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", signature):
            raise CollateralError(f"{what}: response lacks a hex signature")
        return body, signature.lower()

    def _root_ca_crl(self, chain_pem: str) -> bytes:
        """The root CA CRL: from the PCCS, else from the root's CRL distribution point."""
        url = f"{self._base('sgx')}/rootcacrl"
        try:
            return _crl_der(self._get(url, "root CA CRL").body, "root CA CRL")
        except CollateralError as first:
            root = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
            try:
                points = root.extensions.get_extension_for_class(x509.CRLDistributionPoints)
            except x509.ExtensionNotFound:
                raise first from None
            for point in points.value:
                for name in point.full_name or ():
                    if isinstance(name, x509.UniformResourceIdentifier):
                        body = self._get(name.value, "root CA CRL").body
                        return _crl_der(body, f"root CA CRL ({name.value})")
            raise first from None

    def fetch(self, quote: bytes) -> str:
        """Collateral for ``quote``, in dcap-qvl's JSON form; CollateralError if it fails."""
        platform = quote_platform(quote)
        tee = platform.tee_type.lower()
        if tee == "tdx" and self.api_version != "v4":
            raise CollateralError(
                f"PCCS URL {self.url}: TDX collateral needs the v4 API (…/certification/v4/)"
            )
        sgx_base, tee_base = self._base("sgx"), self._base(tee)

        pck = self._get(f"{sgx_base}/pckcrl?ca={platform.ca}", f"PCK CRL ({platform.ca} CA)")
        pck_crl = _crl_der(pck.body, "PCK CRL")
        pck_chain = self._chain(pck, ("SGX-PCK-CRL-Issuer-Chain",), "PCK CRL")

        tcb = self._get(
            f"{tee_base}/tcb?fmspc={platform.fmspc}", f"TCB info (FMSPC {platform.fmspc})"
        )
        tcb_chain = self._chain(
            tcb, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"), "TCB info"
        )
        tcb_info, tcb_signature = self._signed_document(tcb, ("tcbInfo",), "TCB info")

        qe = self._get(f"{tee_base}/qe/identity", "QE identity")
        qe_chain = self._chain(
            qe,
            ("SGX-Enclave-Identity-Issuer-Chain", "Enclave-Identity-Issuer-Chain"),
            "QE identity",
        )
        # "qeIdentity" is how PCS API v1 named it; everything later says "enclaveIdentity".
        qe_identity, qe_signature = self._signed_document(
            qe, ("enclaveIdentity", "qeIdentity"), "QE identity"
        )

        root_crl = self._root_ca_crl(pck_chain)
        collateral = json.dumps(
            {
                "pck_crl_issuer_chain": pck_chain,
                "root_ca_crl": root_crl.hex(),
                "pck_crl": pck_crl.hex(),
                "tcb_info_issuer_chain": tcb_chain,
                "tcb_info": tcb_info,
                "tcb_info_signature": tcb_signature,
                "qe_identity_issuer_chain": qe_chain,
                "qe_identity": qe_identity,
                "qe_identity_signature": qe_signature,
            }
        )
        _validate_collateral(collateral, f"collateral from {self.url}")
        return collateral


def fetch_collateral(
    quote: bytes,
    pccs_url: str,
    *,
    verify_tls: bool = True,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> str:
    """Fetch collateral for ``quote`` from ``pccs_url`` (see :class:`PccsClient`)."""
    return PccsClient(pccs_url, verify_tls=verify_tls, timeout=timeout).fetch(quote)


# --- the server's cache ----------------------------------------------------------------


@dataclass
class _Entry:
    collateral_json: str
    info: CollateralInfo
    fetched_at: float
    refresh_at: float
    next_attempt: float


@dataclass
class CacheStats:
    """Counters for tests and logs: served from cache, fetches tried, fetches failed."""

    hits: int = 0
    fetches: int = 0
    failures: int = 0


class CollateralCache:
    """Collateral for the server's own quote, kept until it needs refreshing.

    An entry (per platform: TEE type, FMSPC, PCK CA) is served until the earliest
    nextUpdate of its TCB info, QE identity and CRLs. It is refreshed ``refresh_margin``
    seconds before that, so peers whose clocks run a little ahead still accept it, and
    at the latest ``max_age`` after fetching, so a TCB recovery published by Intel
    reaches peers within a day rather than a month. If an early refresh fails, the old
    collateral is served (and the refresh retried every ``retry_interval``) until it
    expires. A refresh never replaces collateral with older collateral.

    Thread-safe: at most one fetch runs at a time; while it runs, other callers get
    the cached collateral if it is still valid, or wait for the fetch.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        refresh_margin: float = 3600.0,
        max_age: float | None = 24 * 3600.0,
        retry_interval: float = 60.0,
    ) -> None:
        self._clock = clock
        self.refresh_margin = refresh_margin
        self.max_age = max_age
        self.retry_interval = retry_interval
        self._entries: dict[QuotePlatform, _Entry] = {}
        self._lock = threading.Lock()
        self._fetching = threading.Lock()
        self._freshness = CollateralFreshness()
        self.stats = CacheStats()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _usable(self, entry: _Entry | None, now: float) -> bool:
        return entry is not None and now < entry.info.next_update

    def _wanted(self, entry: _Entry | None, now: float) -> bool:
        """Should this caller try to fetch (True) or serve the entry (False)?"""
        if not self._usable(entry, now):
            return True
        assert entry is not None
        return now >= entry.refresh_at and now >= entry.next_attempt

    def get(
        self,
        quote: bytes,
        fetch: Callable[[bytes], str],
        *,
        validate: Callable[[bytes, str, int], None] | None = None,
    ) -> str:
        """Collateral for ``quote``: cached, or from ``fetch(quote)``.

        ``validate(quote, collateral_json, now)`` may refuse fetched collateral by raising
        CollateralError; ``now`` is this cache's clock.
        """
        key = quote_platform(quote)
        with self._lock:
            entry = self._entries.get(key)
            if not self._wanted(entry, self._clock()):
                self.stats.hits += 1
                assert entry is not None
                return entry.collateral_json
        # Someone else refreshing while we hold valid collateral: do not wait for them.
        blocking = not self._usable(entry, self._clock())
        if not self._fetching.acquire(blocking=blocking):
            with self._lock:
                self.stats.hits += 1
            assert entry is not None
            return entry.collateral_json
        try:
            with self._lock:
                entry = self._entries.get(key)
                now = self._clock()
                if not self._wanted(entry, now):
                    self.stats.hits += 1
                    assert entry is not None
                    return entry.collateral_json
            try:
                fresh = self._fetch(quote, fetch, validate)
            except CollateralError as exc:
                now = self._clock()
                with self._lock:
                    self.stats.failures += 1
                    if entry is not None and self._usable(entry, now):
                        entry.next_attempt = now + self.retry_interval
                        log.warning(
                            "collateral refresh failed, serving the cached collateral until %s: %s",
                            iso_utc(entry.info.next_update),
                            exc,
                        )
                        return entry.collateral_json
                raise
            with self._lock:
                self._entries[key] = fresh
            return fresh.collateral_json
        finally:
            self._fetching.release()

    def _fetch(
        self,
        quote: bytes,
        fetch: Callable[[bytes], str],
        validate: Callable[[bytes, str, int], None] | None,
    ) -> _Entry:
        with self._lock:
            self.stats.fetches += 1
        collateral_json = fetch(quote)
        now = self._clock()
        info = describe_collateral(collateral_json)
        problems = info.describe_expired(int(now))
        if info.next_update <= now or problems:
            raise CollateralError(f"fetched collateral is not valid now: {problems}")
        if validate is not None:
            validate(quote, collateral_json, int(now))
        # Recorded only after validation (see CollateralFreshness); a refresh that is
        # older than what we hand out already is refused here.
        self._freshness.observe(collateral_json, source="own platform")
        refresh_at = info.next_update - self.refresh_margin
        if self.max_age is not None:
            refresh_at = min(refresh_at, now + self.max_age)
        return _Entry(
            collateral_json=collateral_json,
            info=info,
            fetched_at=now,
            refresh_at=refresh_at,
            next_attempt=now + self.retry_interval,
        )


def _validate_own_quote(quote: bytes, collateral_json: str, now: int) -> None:
    """The server checks its own collateral before handing it out.

    allow_simulated only selects the simulated root for simulated quotes; a real
    quote is checked against Intel's root either way.
    """
    from teepsi.attestation.verify import QuoteVerificationError, verify_quote

    try:
        verified = verify_quote(quote, collateral_json, allow_simulated=True, now=now)
    except QuoteVerificationError as exc:
        raise CollateralError(f"fetched collateral does not verify our own quote: {exc}") from None
    log.info(
        "collateral for our own quote: TCB status %s%s",
        verified.tcb_status,
        f" ({', '.join(verified.advisory_ids)})" if verified.advisory_ids else "",
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
    """Collateral for the server's own quote, to staple to its certificate.

    From ``cache`` while valid, else fetched from ``pccs_url`` or the QCNL file's URL
    (:func:`pccs_settings`), checked against the quote, and cached. Raises
    CollateralError (one line) when there is no valid collateral to hand out.
    """

    def fetch(q: bytes) -> str:
        settings = pccs_settings(pccs_url, qcnl_path, verify_tls=verify_tls)
        return fetch_collateral(q, settings.url, verify_tls=settings.verify_tls, timeout=timeout)

    return cache.get(quote, fetch, validate=_validate_own_quote)
