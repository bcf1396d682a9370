"""The entries of a policy (``sgx_mrs``, ``tdx_mrs``), their parsing, and policy errors.

See :mod:`teepsi.attestation.policy` for the file format; this module reads one entry
at a time and says, in one line with its path, what is wrong with it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from teepsi.attestation.evidence import TdIdentity
from teepsi.errors import TeepsiError
from teepsi.jsontext import did_you_mean, is_ignored_key, show

TDX_KEY = "tdx_mrs"
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX_DIGITS = re.compile(r"[0-9a-fA-F]*")
_DECIMAL = re.compile(r"[0-9]+")
_MAX_U16 = 0xFFFF

# tdx_mrs entry: (JSON key, TdIdentity attribute, label) of the 48-byte registers
_TDX_REGISTERS = (
    ("mr_td", "mr_td", "MRTD"),
    ("rtmr0", "rt_mr0", "RTMR0"),
    ("rtmr1", "rt_mr1", "RTMR1"),
    ("rtmr2", "rt_mr2", "RTMR2"),
    ("rtmr3", "rt_mr3", "RTMR3"),
    ("mr_config_id", "mr_config_id", "MRCONFIGID"),
    ("mr_owner", "mr_owner", "MROWNER"),
    ("mr_owner_config", "mr_owner_config", "MROWNERCONFIG"),
)
_TDX_ENTRY_KEYS = (
    *(key for key, _, _ in _TDX_REGISTERS),
    "mr_seam",
    "min_tee_tcb_svn",
    "xfam",
    "name",
)
# (entry attribute / JSON key, label used in messages, flag that enables it)
FIELDS = (
    ("mr_enclave", "MRENCLAVE", "verify_mr_enclave"),
    ("mr_signer", "MRSIGNER", "verify_mr_signer"),
    ("isv_prod_id", "ISV_PROD_ID", "verify_isv_prod_id"),
    ("isv_svn", "ISV_SVN", "verify_isv_svn"),
)
_ENTRY_KEYS = (*(f for f, _, _ in FIELDS), "name")
LABELS = {attr: label for attr, label, _ in FIELDS}


class PolicyError(TeepsiError, ValueError):
    """The policy file is unreadable or malformed; the message is one line."""


class PolicyViolation(TeepsiError):
    """A peer is refused by the policy; the message is one line saying why."""


class TcbStatusRefused(PolicyViolation):
    """The peer's platform TCB status is not accepted (the metrics count it apart)."""


def check_keys(obj: dict[object, object], allowed: Sequence[str], prefix: str) -> None:
    """Refuse unknown keys; ``prefix`` is ``"<source>: "`` or ``"<source>: sgx_mrs[i]."``."""
    for key in obj:
        if not isinstance(key, str):
            raise PolicyError(f"{prefix}{show(key)}: keys must be strings")
        if key in allowed or is_ignored_key(key):
            continue
        suggestion = did_you_mean(key, allowed)
        shown = key if key.isprintable() and len(key) <= 60 else show(key)  # stay one line
        raise PolicyError(
            f'{prefix}{shown}: unknown key{suggestion}; keys starting with "_" or '
            '"comment" are ignored'
        )


def parse_flag(value: object, where: str) -> bool:
    if isinstance(value, bool):
        return value
    # isascii(): no Unicode look-alikes that happen to lower() to "on"
    if isinstance(value, str) and value.isascii() and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise PolicyError(f'{where}: expected "on", "off", true or false, got {show(value)}')


def _parse_mr(value: object, where: str) -> bytes:
    # fullmatch, not bytes.fromhex alone: fromhex would accept spaces
    if isinstance(value, str) and _HEX64.fullmatch(value):
        return bytes.fromhex(value)
    detail = f" ({len(value)} characters)" if isinstance(value, str) else ""
    raise PolicyError(f"{where}: expected 64 hex characters, got {show(value)}{detail}")


def _parse_hex(value: object, where: str, size: int) -> bytes:
    """Exactly ``2 * size`` hex digits (no spaces, no 0x) as ``size`` bytes."""
    if isinstance(value, str) and len(value) == 2 * size and _HEX_DIGITS.fullmatch(value):
        return bytes.fromhex(value)
    detail = f" ({len(value)} characters)" if isinstance(value, str) else ""
    raise PolicyError(f"{where}: expected {2 * size} hex characters, got {show(value)}{detail}")


def parse_int(value: object, where: str, low: int, high: int) -> int:
    """A JSON integer or decimal string in low..high (never a bool, float or null)."""
    # bool is an int subclass in Python: true must not read as 1
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _DECIMAL.fullmatch(value):
        digits = value.lstrip("0") or "0"
        # bound the length before int(): a huge digit string is simply out of range
        number = int(digits) if len(digits) <= len(str(high)) else high + 1
    if number is None or not low <= number <= high:
        raise PolicyError(
            f"{where}: expected an integer {low}..{high} (JSON number or decimal string), "
            f"got {show(value)}"
        )
    return number


def _parse_u16(value: object, where: str) -> int:
    return parse_int(value, where, 0, _MAX_U16)


def parse_name(value: object, where: str) -> str:
    # the name ends up in one-line log and error messages: keep it on one line
    if isinstance(value, str) and value.isprintable():
        return value
    raise PolicyError(f"{where}: expected a single line of text, got {show(value)}")


@dataclass(frozen=True)
class MeasurementEntry:
    """One ``sgx_mrs`` entry; None means the field is absent from the entry."""

    mr_enclave: bytes | None
    mr_signer: bytes | None
    isv_prod_id: int | None
    isv_svn: int | None
    name: str | None = None

    def __post_init__(self) -> None:
        # backstop for entries built in code; from_dict reports errors with their path
        for attr in ("mr_enclave", "mr_signer"):
            mr = getattr(self, attr)
            if mr is not None and (not isinstance(mr, bytes) or len(mr) != 32):
                raise PolicyError(f"MeasurementEntry: {attr}: must be 32 bytes")
        for attr in ("isv_prod_id", "isv_svn"):
            v = getattr(self, attr)
            if v is not None and (
                not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _MAX_U16
            ):
                raise PolicyError(f"MeasurementEntry: {attr}: must be an integer 0..65535")

    def label(self, index: int) -> str:
        """``sgx_mrs[i]`` plus the entry's name when it has one."""
        return f"sgx_mrs[{index}]" + (f" ({show(self.name)})" if self.name else "")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        if self.mr_enclave is not None:
            out["mr_enclave"] = self.mr_enclave.hex()
        if self.mr_signer is not None:
            out["mr_signer"] = self.mr_signer.hex()
        # decimal strings, as the seed writes them; from_dict parses them as numbers
        if self.isv_prod_id is not None:
            out["isv_prod_id"] = str(self.isv_prod_id)
        if self.isv_svn is not None:
            out["isv_svn"] = str(self.isv_svn)
        return out


@dataclass(frozen=True)
class TdxEntry:
    """One ``tdx_mrs`` entry; None means the entry does not constrain that field."""

    mr_td: bytes
    rt_mr0: bytes | None = None
    rt_mr1: bytes | None = None
    rt_mr2: bytes | None = None
    rt_mr3: bytes | None = None
    mr_config_id: bytes | None = None
    mr_owner: bytes | None = None
    mr_owner_config: bytes | None = None
    #: The TDX module measurements accepted (any of them).
    mr_seam: tuple[bytes, ...] | None = None
    #: TEE_TCB_SVN floor, compared byte by byte.
    min_tee_tcb_svn: bytes | None = None
    #: XFAM exactly, as the 8 bytes of the report.
    xfam: bytes | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        # backstop for entries built in code; the parser reports errors with their path
        for _, attr, _ in _TDX_REGISTERS:
            mr = getattr(self, attr)
            if (mr is not None or attr == "mr_td") and (not isinstance(mr, bytes) or len(mr) != 48):
                raise PolicyError(f"TdxEntry: {attr}: must be 48 bytes")
        if self.mr_seam is not None:
            object.__setattr__(self, "mr_seam", tuple(self.mr_seam))
            if not self.mr_seam or any(
                not isinstance(m, bytes) or len(m) != 48 for m in self.mr_seam
            ):
                raise PolicyError("TdxEntry: mr_seam: must be a non-empty list of 48-byte values")
        for attr, size in (("min_tee_tcb_svn", 16), ("xfam", 8)):
            v = getattr(self, attr)
            if v is not None and (not isinstance(v, bytes) or len(v) != size):
                raise PolicyError(f"TdxEntry: {attr}: must be {size} bytes")

    def label(self, index: int) -> str:
        """``tdx_mrs[i]`` plus the entry's name when it has one."""
        return f"{TDX_KEY}[{index}]" + (f" ({show(self.name)})" if self.name else "")

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.name is not None:
            out["name"] = self.name
        for key, attr, _ in _TDX_REGISTERS:
            value = getattr(self, attr)
            if value is not None:
                out[key] = value.hex()
        if self.mr_seam is not None:
            out["mr_seam"] = [m.hex() for m in self.mr_seam]
        if self.min_tee_tcb_svn is not None:
            out["min_tee_tcb_svn"] = self.min_tee_tcb_svn.hex()
        if self.xfam is not None:
            out["xfam"] = self.xfam.hex()
        return out

    def mismatch(self, td: TdIdentity) -> list[str]:
        """Why ``td`` does not match, one phrase per field (empty when it matches)."""
        out: list[str] = []
        for _, attr, label in _TDX_REGISTERS:
            want = getattr(self, attr)
            have: bytes = getattr(td, attr)
            if want is not None and have != want:
                out.append(f"{label} {have.hex()} (expected {want.hex()})")
        if self.mr_seam is not None and td.mr_seam not in self.mr_seam:
            out.append(f"MRSEAM {td.mr_seam.hex()} (not an allowed TDX module)")
        if self.min_tee_tcb_svn is not None and any(
            h < w for h, w in zip(td.tee_tcb_svn, self.min_tee_tcb_svn, strict=True)
        ):
            out.append(
                f"TEE_TCB_SVN {td.tee_tcb_svn.hex()} (below the minimum "
                f"{self.min_tee_tcb_svn.hex()})"
            )
        xfam = td.xfam.to_bytes(8, "little")
        if self.xfam is not None and xfam != self.xfam:
            out.append(f"XFAM {xfam.hex()} (expected {self.xfam.hex()})")
        return out


def parse_entry(raw: object, flags: dict[str, bool], where: str) -> MeasurementEntry:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected an object, got {show(raw)}")
    check_keys(raw, _ENTRY_KEYS, f"{where}.")

    def present(attr: str, flag: str) -> bool:
        if attr in raw:
            return True
        if flags[flag]:
            raise PolicyError(f"{where}.{attr}: missing, but {flag} is on")
        return False

    def mr(attr: str, flag: str) -> bytes | None:
        return _parse_mr(raw[attr], f"{where}.{attr}") if present(attr, flag) else None

    def u16(attr: str, flag: str) -> int | None:
        return _parse_u16(raw[attr], f"{where}.{attr}") if present(attr, flag) else None

    return MeasurementEntry(
        mr_enclave=mr("mr_enclave", "verify_mr_enclave"),
        mr_signer=mr("mr_signer", "verify_mr_signer"),
        isv_prod_id=u16("isv_prod_id", "verify_isv_prod_id"),
        isv_svn=u16("isv_svn", "verify_isv_svn"),
        name=parse_name(raw["name"], f"{where}.name") if "name" in raw else None,
    )


def parse_tdx_entry(raw: object, where: str) -> TdxEntry:
    if not isinstance(raw, dict):
        raise PolicyError(f"{where}: expected an object, got {show(raw)}")
    check_keys(raw, _TDX_ENTRY_KEYS, f"{where}.")
    if "mr_td" not in raw:
        # fail closed: an entry without MRTD would accept any VM image
        raise PolicyError(f"{where}.mr_td: missing (every TDX entry pins the VM image's MRTD)")
    registers = {
        attr: _parse_hex(raw[key], f"{where}.{key}", 48)
        for key, attr, _ in _TDX_REGISTERS
        if key in raw
    }
    mr_seam: tuple[bytes, ...] | None = None
    if "mr_seam" in raw:
        raw_seam = raw["mr_seam"]
        if not isinstance(raw_seam, list) or not raw_seam:
            raise PolicyError(
                f"{where}.mr_seam: expected a non-empty list of TDX module measurements "
                f"(96 hex characters each), got {show(raw_seam)}"
            )
        mr_seam = tuple(_parse_hex(m, f"{where}.mr_seam[{i}]", 48) for i, m in enumerate(raw_seam))
    return TdxEntry(
        mr_td=registers.pop("mr_td"),
        **registers,
        mr_seam=mr_seam,
        min_tee_tcb_svn=(
            _parse_hex(raw["min_tee_tcb_svn"], f"{where}.min_tee_tcb_svn", 16)
            if "min_tee_tcb_svn" in raw
            else None
        ),
        xfam=_parse_hex(raw["xfam"], f"{where}.xfam", 8) if "xfam" in raw else None,
        name=parse_name(raw["name"], f"{where}.name") if "name" in raw else None,
    )


def tdx_entry_for(name: str, td: TdIdentity) -> TdxEntry:
    """A ``tdx_mrs`` entry pinning every register, the TDX module and the TCB of ``td``."""
    return TdxEntry(
        mr_td=td.mr_td,
        rt_mr0=td.rt_mr0,
        rt_mr1=td.rt_mr1,
        rt_mr2=td.rt_mr2,
        rt_mr3=td.rt_mr3,
        mr_config_id=td.mr_config_id,
        mr_owner=td.mr_owner,
        mr_owner_config=td.mr_owner_config,
        mr_seam=(td.mr_seam,),
        min_tee_tcb_svn=td.tee_tcb_svn,
        xfam=td.xfam.to_bytes(8, "little"),
        name=parse_name(name, f"tdx_entry_for: {name!r}"),
    )
