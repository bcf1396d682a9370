"""Collateral documents and their dates: reading dcap-qvl's JSON form (nothing verified).

Collateral is the set of Intel-signed documents a DCAP quote is checked against: TCB
info (per FMSPC), QE identity, the PCK CRL and the root CA CRL, with their issuer
chains. This module reads which documents a set holds, when each was issued and until
when it is valid; :mod:`teepsi.attestation.verify` checks their signatures.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dcap_qvl
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teepsi.attestation.collateral.errors import CollateralError, one_line
from teepsi.jsontext import read_user_text
from teepsi.timefmt import iso_utc

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
        raise CollateralError(f"collateral is not JSON: {one_line(exc)}") from None
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


def validate_collateral(collateral_json: str, where: str) -> None:
    """Refuse what dcap-qvl would not load, with a one-line reason."""
    try:
        dcap_qvl.QuoteCollateralV3.from_json(collateral_json)
    except (ValueError, TypeError) as exc:
        raise CollateralError(f"{where}: not dcap-qvl collateral: {one_line(exc)}") from None
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
    validate_collateral(text, where)
    return text


def describe_expired_at(collateral_json: str, at: int) -> str:
    """`` (at <time>: TCB info … expired <date>; …)`` when documents are out of date, else "".

    dcap-qvl names only the first check that failed ("CrlExpired"); the operator needs
    the document and its date to know what to fetch. Unreadable collateral gives "".
    """
    try:
        expired = describe_collateral(collateral_json).describe_expired(at)
    except CollateralError:
        return ""
    return f" (at {iso_utc(at)}: {expired})" if expired else ""
