"""The PCCS client: fetching collateral for a quote over HTTP(S).

Verification (:mod:`teepsi.attestation.verify`) never touches the network; this is
the one place that does. Every document is signed under Intel's root, so an
unauthenticated PCCS connection is safe for integrity.

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

import ipaddress
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from http.client import HTTPMessage
from typing import IO

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from teepsi._version import __version__
from teepsi.attestation.collateral.documents import validate_collateral
from teepsi.attestation.collateral.endpoints import PccsEndpoints
from teepsi.attestation.collateral.errors import CollateralError, one_line
from teepsi.attestation.collateral.platform import quote_platform
from teepsi.attestation.collateral.qcnl import check_url

DEFAULT_TIMEOUT_SECONDS = 30.0
#: Largest PCCS response read; Intel's biggest documents (platform CA CRLs) are far smaller.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


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


class PccsCertificateError(CollateralError):
    """The PCCS's TLS certificate did not verify; callers name their switch to skip that."""


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
        self.endpoints = PccsEndpoints.parse(pccs_url)
        self.url = self.endpoints.url
        self.api_version = self.endpoints.api_version
        self.verify_tls = verify_tls
        self.timeout = timeout
        context = ssl.create_default_context()
        if not verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        handlers: list[urllib.request.BaseHandler] = [
            urllib.request.HTTPSHandler(context=context),
            _HttpRedirectsOnly(),
        ]
        if _is_loopback(self.endpoints.hostname):
            # A PCCS on this machine must not be sent through an HTTP proxy from the env.
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def _get(self, url: str, what: str) -> _Response:
        check_url(url, what)  # http(s) only: never file: or other schemes
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
                f"PCCS refused {what} ({url}): HTTP {exc.code} {one_line(exc.reason)}"
            ) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            detail = getattr(reason, "strerror", None) or reason
            message = f"cannot reach PCCS for {what} ({url}): {one_line(detail)}"
            if isinstance(reason, ssl.SSLCertVerificationError):
                raise PccsCertificateError(
                    f"{message} (a self-signed PCCS needs USE_SECURE_CERT=FALSE in the QCNL "
                    "config, or TLS verification of the PCCS turned off)"
                ) from None
            raise CollateralError(message) from None
        except (TimeoutError, OSError, ValueError) as exc:
            raise CollateralError(
                f"cannot reach PCCS for {what} ({url}): {one_line(exc) or type(exc).__name__}"
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
        url = self.endpoints.root_ca_crl()
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
        self.endpoints.check_platform(platform)
        urls = self.endpoints
        pck = self._get(urls.pck_crl(platform), f"PCK CRL ({platform.ca} CA)")
        pck_crl = _crl_der(pck.body, "PCK CRL")
        pck_chain = self._chain(pck, ("SGX-PCK-CRL-Issuer-Chain",), "PCK CRL")

        tcb = self._get(urls.tcb_info(platform), f"TCB info (FMSPC {platform.fmspc})")
        tcb_chain = self._chain(
            tcb, ("TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"), "TCB info"
        )
        tcb_info, tcb_signature = self._signed_document(tcb, ("tcbInfo",), "TCB info")

        qe = self._get(urls.qe_identity(platform), "QE identity")
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
        validate_collateral(collateral, f"collateral from {self.url}")
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
