"""Which attested peers are accepted: the seed's ``dynamic_config.json``, made strict.

Schema (Intel cczoo/psi's ``dynamic_config.json``, unchanged, plus optional extensions)::

    {"verify_mr_enclave": "on", "verify_mr_signer": "on",
     "verify_isv_prod_id": "on", "verify_isv_svn": "on",
     "allow_outdated_tcb": "off", "allow_hw_config_needed": "off",
     "allow_sw_hardening_needed": "off",
     "sgx_mrs": [{"name": "teepsi server",
                  "mr_enclave": "<64 hex>", "mr_signer": "<64 hex>",
                  "isv_prod_id": "1", "isv_svn": "0"}]}

Meaning: a peer is accepted when ANY ``sgx_mrs`` entry matches on EVERY enabled field
(MRENCLAVE, MRSIGNER and ISV_PROD_ID equal; ISV_SVN greater or equal), its SGX
attributes pass Gramine's fixed rules, and its TCB status is UpToDate or explicitly
allowed. Parsing fails closed:

* all four ``verify_*`` flags are required (the seed's files always carry them, and a
  missing flag must not silently mean "off");
* flags are ``"on"``/``"off"`` (any case) or JSON ``true``/``false``; the ``allow_*``
  flags are optional and default to off;
* ``sgx_mrs`` is required; it must be non-empty unless every ``verify_*`` flag is off
  (then any enclave on a genuine platform is accepted, and a warning is logged);
* a field that is verified must be present in every entry; an unverified field may be
  absent, but is still validated when present;
* MRs are exactly 64 hex digits; ISV values are JSON integers or decimal strings in
  0..65535 (the seed's reference silently read strings as 0);
* unknown keys are errors, except keys starting with ``_`` or ``comment``, which are
  ignored everywhere so that files can carry notes;
* two optional collateral rules (teepsi extensions), absent meaning "no rule":
  ``min_tcb_evaluation_data_number`` (an integer 0..2^32-1: TCB info and QE identity
  must carry at least this tcbEvaluationDataNumber, e.g. the number of Intel's latest
  TCB recovery) and ``max_collateral_age_days`` (an integer 1..3650: no document of the
  collateral may be issued longer ago than this, as of the verification time);
* :meth:`Policy.load` also refuses duplicate keys and NaN/Infinity.

TDX virtual machines (teepsi extension) are listed in ``tdx_mrs`` beside ``sgx_mrs``;
a TD is accepted when ANY entry matches on EVERY field the entry sets::

    "tdx_mrs": [{"name": "teepsi VM image 2026-12",
                 "mr_td": "<96 hex>",                      # required
                 "rtmr0": "<96 hex>", ..., "rtmr3": "<96 hex>",   # each optional
                 "mr_config_id": "<96 hex>", "mr_owner": "<96 hex>",
                 "mr_owner_config": "<96 hex>",              # optional
                 "mr_seam": ["<96 hex>", ...],               # allowed TDX modules
                 "min_tee_tcb_svn": "<32 hex>",              # each byte a minimum
                 "xfam": "<16 hex>"}]                        # exact, as the report shows

A TD with the DEBUG attribute is always refused, and one without SEPT_VE_DISABLE too;
the TCB status rules (``allow_*``) and collateral rules are the same as for SGX. With
``tdx_mrs`` present, ``sgx_mrs`` may be absent or empty: then no SGX enclave is
accepted. Without ``tdx_mrs`` no TD is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from teepsi.attestation.evidence import (
    AttributeFlag,
    EnclaveIdentity,
    TdAttributeFlag,
    TdIdentity,
)
from teepsi.attestation.policy_entries import (
    FIELDS,
    LABELS,
    TDX_KEY,
    MeasurementEntry,
    PolicyError,
    PolicyViolation,
    TcbStatusRefused,
    TdxEntry,
    check_keys,
    parse_entry,
    parse_flag,
    parse_int,
    parse_name,
    parse_tdx_entry,
    tdx_entry_for,
)
from teepsi.attestation.tcb import ALLOWANCE_KEYS, TcbAllowances
from teepsi.jsontext import read_user_text, show, strict_json_loads

if TYPE_CHECKING:
    from teepsi.attestation.collateral import CollateralInfo

__all__ = [
    "MeasurementEntry",
    "Policy",
    "PolicyError",
    "PolicyViolation",
    "TcbAllowances",
    "TcbStatusRefused",
    "TdxEntry",
    "policy_for",
    "tdx_entry_for",
]

log = logging.getLogger(__name__)


_VERIFY_KEYS = ("verify_mr_enclave", "verify_mr_signer", "verify_isv_prod_id", "verify_isv_svn")
_ALLOW_KEYS = ALLOWANCE_KEYS
_MIN_EVALUATION_KEY = "min_tcb_evaluation_data_number"
_MAX_AGE_KEY = "max_collateral_age_days"
_MAX_EVALUATION_NUMBER = 0xFFFFFFFF
_MAX_AGE_DAYS = 3650
_DAY_SECONDS = 24 * 3600
_TDX_KEY = TDX_KEY
_TOP_KEYS = (
    *_VERIFY_KEYS,
    *_ALLOW_KEYS,
    "sgx_mrs",
    _TDX_KEY,
    _MIN_EVALUATION_KEY,
    _MAX_AGE_KEY,
)


@dataclass(frozen=True)
class Policy:
    """The peer-acceptance policy; see the module docstring for the file format."""

    verify_mr_enclave: bool
    verify_mr_signer: bool
    verify_isv_prod_id: bool
    verify_isv_svn: bool
    entries: tuple[MeasurementEntry, ...]
    tcb: TcbAllowances = field(default_factory=TcbAllowances)
    #: Lowest tcbEvaluationDataNumber accepted in TCB info and QE identity (None: any).
    min_tcb_evaluation_data_number: int | None = None
    #: Oldest collateral accepted, in days before the verification time (None: any).
    max_collateral_age_days: int | None = None
    #: The accepted TDX VMs (``tdx_mrs``); empty: no TD is accepted.
    tdx_entries: tuple[TdxEntry, ...] = ()

    def __post_init__(self) -> None:
        # invariants hold however the policy was built, not only when parsed
        object.__setattr__(self, "entries", tuple(self.entries))
        object.__setattr__(self, "tdx_entries", tuple(self.tdx_entries))
        for tdx_entry in self.tdx_entries:
            if not isinstance(tdx_entry, TdxEntry):
                raise PolicyError("Policy: tdx_entries: must be TdxEntry objects")
        for attr, low, high in (
            (_MIN_EVALUATION_KEY, 0, _MAX_EVALUATION_NUMBER),
            (_MAX_AGE_KEY, 1, _MAX_AGE_DAYS),
        ):
            value = getattr(self, attr)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high
            ):
                raise PolicyError(f"Policy: {attr}: must be an integer {low}..{high} or None")
        for flag in _VERIFY_KEYS:
            if not isinstance(getattr(self, flag), bool):
                raise PolicyError(f"Policy: {flag}: must be a bool")
        enabled = [flag for flag in _VERIFY_KEYS if getattr(self, flag)]
        for entry in self.entries:
            if not isinstance(entry, MeasurementEntry):
                raise PolicyError("Policy: entries: must be MeasurementEntry objects")
        if enabled and not self.entries and not self.tdx_entries:
            raise PolicyError(
                f"Policy: sgx_mrs: must list at least one entry when {enabled[0]} is on"
            )
        for i, entry in enumerate(self.entries):
            for attr, _, flag in FIELDS:
                if getattr(self, flag) and getattr(entry, attr) is None:
                    raise PolicyError(f"Policy: sgx_mrs[{i}].{attr}: required when {flag} is on")
        if not enabled and (self.entries or not self.tdx_entries):
            log.warning(
                "POLICY VERIFIES NO MEASUREMENT: all verify_* flags are off, so ANY enclave "
                "on a genuine SGX platform will be accepted as a peer"
            )

    # ---- parsing -----------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: object, *, source: str = "policy") -> Policy:
        """Build a policy from parsed JSON; errors are ``<source>: <field>: <problem>``."""
        if not isinstance(data, dict):
            raise PolicyError(
                f"{source}: expected a JSON object at the top level, got {show(data)}"
            )
        check_keys(data, _TOP_KEYS, f"{source}: ")
        flags: dict[str, bool] = {}
        for key in _VERIFY_KEYS:
            if key not in data:
                # fail closed: a forgotten flag must not silently disable a check
                raise PolicyError(f'{source}: {key}: missing (set it to "on" or "off")')
            flags[key] = parse_flag(data[key], f"{source}: {key}")
        allow = {key: parse_flag(data.get(key, False), f"{source}: {key}") for key in _ALLOW_KEYS}

        tdx_entries: tuple[TdxEntry, ...] = ()
        if _TDX_KEY in data:
            raw_tdx = data[_TDX_KEY]
            if not isinstance(raw_tdx, list) or not raw_tdx:
                raise PolicyError(
                    f"{source}: {_TDX_KEY}: expected a non-empty list of TDX entries, "
                    f"got {show(raw_tdx)}"
                )
            tdx_entries = tuple(
                parse_tdx_entry(raw, f"{source}: {_TDX_KEY}[{i}]") for i, raw in enumerate(raw_tdx)
            )
        if "sgx_mrs" not in data and not tdx_entries:
            raise PolicyError(
                f"{source}: sgx_mrs: missing (a list of measurement entries); a policy "
                f"for TDX VMs only lists them in {_TDX_KEY} instead"
            )
        raw_entries = data.get("sgx_mrs", [])
        if not isinstance(raw_entries, list):
            raise PolicyError(f"{source}: sgx_mrs: expected a list, got {show(raw_entries)}")
        enabled = [key for key in _VERIFY_KEYS if flags[key]]
        if enabled and not raw_entries and not tdx_entries:
            raise PolicyError(
                f"{source}: sgx_mrs: is empty, but {enabled[0]} is on (list at least one entry)"
            )
        entries = tuple(
            parse_entry(raw, flags, f"{source}: sgx_mrs[{i}]") for i, raw in enumerate(raw_entries)
        )
        # Present means a rule: null is not "no rule" but an error, like any odd value.
        min_evaluation = (
            parse_int(
                data[_MIN_EVALUATION_KEY],
                f"{source}: {_MIN_EVALUATION_KEY}",
                0,
                _MAX_EVALUATION_NUMBER,
            )
            if _MIN_EVALUATION_KEY in data
            else None
        )
        max_age = (
            parse_int(data[_MAX_AGE_KEY], f"{source}: {_MAX_AGE_KEY}", 1, _MAX_AGE_DAYS)
            if _MAX_AGE_KEY in data
            else None
        )
        return cls(
            verify_mr_enclave=flags["verify_mr_enclave"],
            verify_mr_signer=flags["verify_mr_signer"],
            verify_isv_prod_id=flags["verify_isv_prod_id"],
            verify_isv_svn=flags["verify_isv_svn"],
            entries=entries,
            tcb=TcbAllowances(
                outdated=allow["allow_outdated_tcb"],
                hw_config_needed=allow["allow_hw_config_needed"],
                sw_hardening_needed=allow["allow_sw_hardening_needed"],
            ),
            min_tcb_evaluation_data_number=min_evaluation,
            max_collateral_age_days=max_age,
            tdx_entries=tdx_entries,
        )

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a policy JSON file; every failure is a one-line PolicyError naming ``path``."""
        where = str(path)
        text = read_user_text(path, lambda problem: PolicyError(f"{where}: {problem}"))

        data = strict_json_loads(text, lambda problem: PolicyError(f"{where}: {problem}"))
        return cls.from_dict(data, source=where)

    def to_dict(self) -> dict[str, object]:
        """The seed's schema: "on"/"off" flags, hex MRs, ISV values as decimal strings."""
        on_off = {True: "on", False: "off"}
        out: dict[str, object] = {key: on_off[bool(getattr(self, key))] for key in _VERIFY_KEYS}
        out["allow_outdated_tcb"] = on_off[self.tcb.outdated]
        out["allow_hw_config_needed"] = on_off[self.tcb.hw_config_needed]
        out["allow_sw_hardening_needed"] = on_off[self.tcb.sw_hardening_needed]
        out["sgx_mrs"] = [entry.to_dict() for entry in self.entries]
        if self.tdx_entries:
            out[_TDX_KEY] = [entry.to_dict() for entry in self.tdx_entries]
        if self.min_tcb_evaluation_data_number is not None:
            out[_MIN_EVALUATION_KEY] = self.min_tcb_evaluation_data_number
        if self.max_collateral_age_days is not None:
            out[_MAX_AGE_KEY] = self.max_collateral_age_days
        return out

    def with_tcb(self, tcb: TcbAllowances) -> Policy:
        """This policy with ``tcb`` added to its TCB allowances.

        Union, not replacement: command-line flags may widen what the file allows, but
        leaving them unset must not drop an allowance the file grants.
        """
        merged = self.tcb.union(tcb)
        return self if merged == self.tcb else replace(self, tcb=merged)

    # ---- checking ----------------------------------------------------------------

    def check(self, identity: EnclaveIdentity, tcb_status: str) -> MeasurementEntry:
        """Return the entry ``identity`` matches, or raise PolicyViolation saying why not.

        Order: attributes, TCB status, then entries. With all verify flags off, the
        first entry is returned, or a blank entry when there are none.
        """
        _check_attributes(identity.attribute_flags)
        self.tcb.check(tcb_status)
        if not self.entries:
            if self.tdx_entries:
                # A TDX-only policy: an SGX enclave was never meant to be accepted.
                raise PolicyViolation(
                    f"peer is an SGX enclave, but the policy lists none (sgx_mrs is empty; "
                    f"only {_TDX_KEY} VMs are accepted)"
                )
            return MeasurementEntry(None, None, None, None)
        best: tuple[int, int, list[str]] | None = None
        for index, entry in enumerate(self.entries):
            mismatched = self._mismatches(entry, identity)
            if not mismatched:
                return entry
            if best is None or len(mismatched) < len(best[2]):
                best = (index, len(mismatched), mismatched)
        assert best is not None
        index, _, mismatched = best
        raise PolicyViolation(_describe(self.entries[index], index, identity, mismatched))

    def check_td(self, td: TdIdentity, tcb_status: str) -> TdxEntry:
        """Return the ``tdx_mrs`` entry ``td`` matches, or raise PolicyViolation saying why.

        Order: TD attributes, TCB status, then entries (the closest one is named).
        """
        if td.td_attributes & TdAttributeFlag.DEBUG:
            raise PolicyViolation(
                "peer is a DEBUG TD (its memory and state are readable by the host)"
            )
        if not td.td_attributes & TdAttributeFlag.SEPT_VE_DISABLE:
            raise PolicyViolation(
                "peer TD lacks the SEPT_VE_DISABLE attribute (refused: the host could "
                "inject #VE exceptions)"
            )
        self.tcb.check(tcb_status)
        if not self.tdx_entries:
            raise PolicyViolation(
                f"peer is a TDX VM, but the policy lists none (add it to {_TDX_KEY})"
            )
        best: tuple[int, list[str]] | None = None
        for index, entry in enumerate(self.tdx_entries):
            problems = entry.mismatch(td)
            if not problems:
                return entry
            if best is None or len(problems) < len(best[1]):
                best = (index, problems)
        assert best is not None
        index, problems = best
        where = self.tdx_entries[index].label(index)
        text = f"peer TD matches no {_TDX_KEY} entry (closest: {where}: {problems[0]})"
        if problems[1:]:
            text += f"; it also differs in {len(problems) - 1} more field(s)"
        raise PolicyViolation(text)

    def check_collateral(self, info: CollateralInfo, at: int) -> None:
        """Raise PolicyViolation unless the (verified) collateral meets the policy's rules.

        ``at`` is the verification time: a receipt checked later is judged as of its
        issue time, as the live peer was.
        """
        floor = self.min_tcb_evaluation_data_number
        if floor is not None:
            for item in info.items:
                if item.kind not in ("TCB info", "QE identity"):
                    continue
                if item.evaluation_number is None or item.evaluation_number < floor:
                    have = "none" if item.evaluation_number is None else item.evaluation_number
                    raise PolicyViolation(
                        f"collateral's {item.label} has TCB evaluation data number {have}, "
                        f"below the policy's {_MIN_EVALUATION_KEY} {floor} (fetch current "
                        "collateral from the PCCS)"
                    )
        max_days = self.max_collateral_age_days
        if max_days is not None:
            for item in info.items:
                age = at - item.issued
                if age > max_days * _DAY_SECONDS:
                    raise PolicyViolation(
                        f"collateral's {item.label} was issued {age // _DAY_SECONDS} days "
                        f"before the verification time, more than the policy's "
                        f"{_MAX_AGE_KEY} {max_days} (fetch current collateral from the PCCS)"
                    )

    def _mismatches(self, entry: MeasurementEntry, identity: EnclaveIdentity) -> list[str]:
        out: list[str] = []
        for attr, _, flag in FIELDS:
            if not getattr(self, flag):
                continue
            want = getattr(entry, attr)
            have = getattr(identity, attr)
            # ISV_SVN is a minimum (newer security versions are accepted); the rest are equal
            ok = have >= want if attr == "isv_svn" else have == want
            if not ok:
                out.append(attr)
        return out


def _check_attributes(flags: int) -> None:
    """Gramine's fixed attribute rules; not configurable on purpose."""
    if flags & AttributeFlag.DEBUG:
        raise PolicyViolation("peer is a DEBUG enclave (its memory is readable by the host)")
    if not flags & AttributeFlag.INIT:
        raise PolicyViolation("peer enclave lacks the INIT attribute (not initialised)")
    if not flags & AttributeFlag.MODE64BIT:
        raise PolicyViolation("peer enclave lacks the MODE64BIT attribute (not a 64-bit enclave)")
    if flags & AttributeFlag.PROVISION_KEY:
        raise PolicyViolation("peer enclave has the PROVISION_KEY attribute (refused)")
    if flags & AttributeFlag.EINITTOKEN_KEY:
        raise PolicyViolation("peer enclave has the EINITTOKEN_KEY attribute (refused)")


def _describe(
    entry: MeasurementEntry, index: int, identity: EnclaveIdentity, mismatched: list[str]
) -> str:
    """One line: the first mismatching field of the closest entry, expected vs actual."""
    attr = mismatched[0]
    label = LABELS[attr]
    want = getattr(entry, attr)
    have = getattr(identity, attr)
    where = entry.label(index)
    if attr == "isv_svn":
        text = f"peer ISV_SVN {have} is below the required {want} ({where})"
    else:
        shown_have = have.hex() if isinstance(have, bytes) else str(have)
        shown_want = want.hex() if isinstance(want, bytes) else str(want)
        text = (
            f"peer {label} {shown_have} matches no sgx_mrs entry "
            f"(closest: {where} expects {shown_want})"
        )
    others = [LABELS[a] for a in mismatched[1:]]
    if others:
        text += f"; {where} also differs in {', '.join(others)}"
    return text


def policy_for(
    identities: Sequence[tuple[str, EnclaveIdentity]],
    tds: Sequence[tuple[str, TdIdentity]] = (),
) -> Policy:
    """A policy accepting exactly these enclaves (all four fields verified) and TDs.

    Used by ``teepsi measure`` to write the policy file for a deployment.
    """
    if not identities and not tds:
        raise PolicyError("policy_for: at least one identity is required")
    entries = tuple(
        MeasurementEntry(
            mr_enclave=ident.mr_enclave,
            mr_signer=ident.mr_signer,
            isv_prod_id=ident.isv_prod_id,
            isv_svn=ident.isv_svn,
            name=parse_name(name, f"policy_for: {name!r}"),
        )
        for name, ident in identities
    )
    return Policy(
        verify_mr_enclave=True,
        verify_mr_signer=True,
        verify_isv_prod_id=True,
        verify_isv_svn=True,
        entries=entries,
        tdx_entries=tuple(tdx_entry_for(name, td) for name, td in tds),
    )
