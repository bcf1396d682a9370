"""A small fake PCCS on loopback, serving collateral in the PCCS / PCS API's shape.

It serves one set of collateral (dcap-qvl's JSON form, as in ``tests/vectors`` or from
``SimPlatform.collateral_json()``) the way Intel's PCCS and PCS do:

* ``GET {base}/pckcrl?ca=processor|platform``: the PCK CRL (DER, hex text or PEM), with
  the ``SGX-PCK-CRL-Issuer-Chain`` header;
* ``GET {base}/tcb?fmspc=…``: ``{"tcbInfo": …, "signature": "<hex>"}`` with
  ``SGX-TCB-Info-Issuer-Chain`` (v3) or ``TCB-Info-Issuer-Chain`` (v4);
* ``GET {base}/qe/identity``: ``{"enclaveIdentity": …, "signature": "<hex>"}`` with
  ``SGX-Enclave-Identity-Issuer-Chain``;
* ``GET {base}/rootcacrl``: the root CA CRL (hex text, as Intel's PCCS serves it).

``base`` is ``/sgx/certification/v3`` or ``/v4``; TCB info and QE identity of TDX
collateral are served under ``/tdx/certification/v4``. Issuer chains are URL-encoded
PEM. Counters per endpoint let tests assert caching.
"""

from __future__ import annotations

import datetime as dt
import json
import ssl
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _crl_body(der: bytes, encoding: str) -> bytes:
    if encoding == "der":
        return der
    if encoding == "hex":
        return der.hex().encode()
    if encoding == "pem":
        crl = x509.load_der_x509_crl(der)
        return crl.public_bytes(serialization.Encoding.PEM)
    raise ValueError(f"unknown CRL encoding {encoding!r}")


def _crl_ca(der: bytes) -> str:
    """Which PCK CA issued a CRL: Intel's (and the simulation's) names say it."""
    issuer = x509.load_der_x509_crl(der).issuer.rfc4514_string().lower()
    return "platform" if "platform" in issuer else "processor"


def self_signed_pem(common_name: str, dns_names: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """(certificate PEM, PKCS#8 key PEM) of a fresh self-signed P-256 certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False
        )
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class FakePccs:
    """A threaded HTTP(S) server on 127.0.0.1 with a random port."""

    def __init__(
        self,
        collateral_json: str,
        *,
        api_version: str = "v4",
        crl_encoding: str = "der",
        tls: bool = False,
    ) -> None:
        self.api_version = api_version
        self.crl_encoding = crl_encoding
        self.requests: Counter[str] = Counter()
        self.paths: list[str] = []
        #: When set, every request is answered with this HTTP status and no body.
        self.fail_status: int | None = None
        #: Paths (e.g. "rootcacrl") answered with 404, as Intel's PCS does for rootcacrl.
        self.missing: set[str] = set()
        #: When set, every request is redirected to this origin (same path and query).
        self.redirect: str | None = None
        self._lock = threading.Lock()
        self.set_collateral(collateral_json)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.tls = tls
        self.cert_pem = b""
        if tls:
            self._wrap_tls()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    # -- configuration ---------------------------------------------------------------

    def set_collateral(self, collateral_json: str) -> None:
        doc: dict[str, Any] = json.loads(collateral_json)
        tcb_info = json.loads(doc["tcb_info"])
        with self._lock:
            self._doc = doc
            self._fmspc = str(tcb_info["fmspc"]).upper()
            self._tee = "tdx" if tcb_info.get("id") == "TDX" else "sgx"
            self._pck_crl = bytes.fromhex(doc["pck_crl"])
            self._ca = _crl_ca(self._pck_crl)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def origin(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The PCCS URL as it appears in sgx_default_qcnl.conf."""
        return f"{self.origin}/sgx/certification/{self.api_version}/"

    def count(self, endpoint: str) -> int:
        """Requests seen for ``endpoint`` ("pckcrl", "tcb", "qe/identity", "rootcacrl")."""
        with self._lock:
            return self.requests[endpoint]

    def total(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakePccs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wrap_tls(self) -> None:
        # A self-signed certificate, as most on-premises PCCS installations use.
        self.cert_pem, key_pem = self_signed_pem("fake-pccs")
        with tempfile.TemporaryDirectory() as tmp:
            cert_file, key_file = Path(tmp) / "c.pem", Path(tmp) / "k.pem"
            cert_file.write_bytes(self.cert_pem)
            key_file.write_bytes(key_pem)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert_file, key_file)
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)

    # -- serving ---------------------------------------------------------------------

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            doc = self._doc
            fmspc, tee, pck_crl, ca = self._fmspc, self._tee, self._pck_crl, self._ca
        v = self.api_version
        sgx = f"/sgx/certification/{v}/"
        # TDX collateral lives under /tdx/ in API v4; SGX under /sgx/.
        tee_base = f"/{tee}/certification/{v}/"
        endpoint = ""
        if path.startswith(sgx):
            endpoint = path[len(sgx) :]
            if endpoint in ("tcb", "qe/identity") and tee != "sgx":
                endpoint = ""
        elif tee != "sgx" and path.startswith(tee_base):
            endpoint = path[len(tee_base) :]
            if endpoint not in ("tcb", "qe/identity"):
                endpoint = ""
        if not endpoint:
            return 404, {}, b"no such endpoint"
        with self._lock:
            self.requests[endpoint] += 1
            self.paths.append(path)
        if self.fail_status is not None:
            return self.fail_status, {}, b""
        if endpoint in self.missing:
            return 404, {}, b""

        def chain(value: str) -> str:
            return quote(value, safe="")

        if endpoint == "pckcrl":
            if query.get("ca", [""])[0] != ca:
                return 404, {}, b"no CRL for this CA"
            headers = {"SGX-PCK-CRL-Issuer-Chain": chain(doc["pck_crl_issuer_chain"])}
            return 200, headers, _crl_body(pck_crl, self.crl_encoding)
        if endpoint == "rootcacrl":
            # Intel's PCCS answers with the DER CRL as hex text.
            return 200, {}, doc["root_ca_crl"].encode()
        if endpoint == "tcb":
            if query.get("fmspc", [""])[0].upper() != fmspc:
                return 404, {}, b"no TCB info for this FMSPC"
            header = "TCB-Info-Issuer-Chain" if v == "v4" else "SGX-TCB-Info-Issuer-Chain"
            # The signed document goes out byte for byte, as Intel's PCS sends it.
            body = '{"tcbInfo":' + doc["tcb_info"] + ',"signature":"' + doc["tcb_info_signature"]
            body += '"}'
            return 200, {header: chain(doc["tcb_info_issuer_chain"])}, body.encode()
        if endpoint == "qe/identity":
            body = '{"enclaveIdentity":' + doc["qe_identity"] + ',"signature":"'
            body += doc["qe_identity_signature"] + '"}'
            headers = {"SGX-Enclave-Identity-Issuer-Chain": chain(doc["qe_identity_issuer_chain"])}
            return 200, headers, body.encode()
        return 404, {}, b"no such endpoint"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        pccs = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if pccs.redirect is not None:
                    self.send_response(302)
                    self.send_header("Location", pccs.redirect + self.path)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                parts = urlsplit(self.path)
                status, headers, body = pccs._route(parts.path, parse_qs(parts.query))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

        return Handler


@contextmanager
def fake_pccs(collateral_json: str, **options: Any) -> Iterator[FakePccs]:
    server = FakePccs(collateral_json, **options)
    try:
        yield server
    finally:
        server.close()
