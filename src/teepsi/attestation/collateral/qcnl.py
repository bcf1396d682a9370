"""Intel's QCNL configuration (``sgx_default_qcnl.conf``): where collateral comes from.

Both formats Intel ships are read: ``KEY=VALUE`` lines and JSON with ``//`` comments.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from teepsi.attestation.collateral.errors import CollateralError
from teepsi.jsontext import read_user_text

DEFAULT_QCNL_PATH = Path("/etc/sgx_default_qcnl.conf")


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


def check_url(url: str, where: str) -> str:
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
            return check_url(value, f"{source}: {key}") if key != "pccs_api_version" else value

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
            return check_url(value, f"{source}: line {number}: {key}")

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


class PccsUrlMissing(CollateralError):
    """No PCCS URL was given and no QCNL file names one; callers add how to give one."""


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
        url = check_url(pccs_url, "PCCS URL")
        if verify_tls is None and qcnl_path is not None:
            verify_tls = QcnlConfig.load(qcnl_path).use_secure_cert
        return PccsSettings(url, True if verify_tls is None else verify_tls)
    path = Path(qcnl_path) if qcnl_path is not None else DEFAULT_QCNL_PATH
    if qcnl_path is None and not path.exists():
        raise PccsUrlMissing(f"no PCCS URL: set PCCS_URL in {path} (file not found)")
    config = QcnlConfig.load(path)
    return PccsSettings(
        config.collateral_url, config.use_secure_cert if verify_tls is None else verify_tls
    )
