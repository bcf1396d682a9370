"""The one table of TCB statuses: what Intel's TCB info says, and what accepting each needs.

dcap-qvl reports a platform's status as Intel's TCB info names it. UpToDate is always
accepted, Revoked and unknown statuses never; every other status needs the allowances
:data:`ALLOWANCES_NEEDED` lists, all of them (the policy's ``allow_*`` keys; the command
line maps them to its own flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from teepsi.attestation.policy_entries import PolicyError, TcbStatusRefused
from teepsi.jsontext import show

__all__ = [
    "ALLOWANCES_NEEDED",
    "ALLOWANCE_KEYS",
    "ALLOW_HW_CONFIG_NEEDED",
    "ALLOW_OUTDATED",
    "ALLOW_SW_HARDENING_NEEDED",
    "TcbAllowances",
    "TcbStatus",
]


class TcbStatus(StrEnum):
    """The ``tcbStatus`` values of Intel's TCB info (what dcap-qvl reports as status)."""

    UP_TO_DATE = "UpToDate"
    SW_HARDENING_NEEDED = "SWHardeningNeeded"
    CONFIGURATION_NEEDED = "ConfigurationNeeded"
    CONFIGURATION_AND_SW_HARDENING_NEEDED = "ConfigurationAndSWHardeningNeeded"
    OUT_OF_DATE = "OutOfDate"
    OUT_OF_DATE_CONFIGURATION_NEEDED = "OutOfDateConfigurationNeeded"
    REVOKED = "Revoked"


#: The policy keys that allow a status other than UpToDate.
ALLOW_OUTDATED = "allow_outdated_tcb"
ALLOW_HW_CONFIG_NEEDED = "allow_hw_config_needed"
ALLOW_SW_HARDENING_NEEDED = "allow_sw_hardening_needed"
ALLOWANCE_KEYS = (ALLOW_OUTDATED, ALLOW_HW_CONFIG_NEEDED, ALLOW_SW_HARDENING_NEEDED)

#: TCB status -> the allowances accepting it needs, all of them. Revoked is absent: no
#: allowance accepts it.
ALLOWANCES_NEEDED: dict[str, tuple[str, ...]] = {
    TcbStatus.UP_TO_DATE: (),
    TcbStatus.SW_HARDENING_NEEDED: (ALLOW_SW_HARDENING_NEEDED,),
    TcbStatus.CONFIGURATION_NEEDED: (ALLOW_HW_CONFIG_NEEDED,),
    TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED: (
        ALLOW_HW_CONFIG_NEEDED,
        ALLOW_SW_HARDENING_NEEDED,
    ),
    TcbStatus.OUT_OF_DATE: (ALLOW_OUTDATED,),
    TcbStatus.OUT_OF_DATE_CONFIGURATION_NEEDED: (ALLOW_OUTDATED, ALLOW_HW_CONFIG_NEEDED),
}


@dataclass(frozen=True)
class TcbAllowances:
    """Which non-UpToDate TCB statuses are accepted; Revoked and unknown ones never are."""

    outdated: bool = False
    hw_config_needed: bool = False
    sw_hardening_needed: bool = False

    def __post_init__(self) -> None:
        # a truthy string such as "off" must not silently widen the policy
        for attr in ("outdated", "hw_config_needed", "sw_hardening_needed"):
            if not isinstance(getattr(self, attr), bool):
                raise PolicyError(f"TcbAllowances: {attr}: must be a bool")

    def _allowed(self, key: str) -> bool:
        return {
            ALLOW_OUTDATED: self.outdated,
            ALLOW_HW_CONFIG_NEEDED: self.hw_config_needed,
            ALLOW_SW_HARDENING_NEEDED: self.sw_hardening_needed,
        }[key]

    def union(self, other: TcbAllowances) -> TcbAllowances:
        return TcbAllowances(
            outdated=self.outdated or other.outdated,
            hw_config_needed=self.hw_config_needed or other.hw_config_needed,
            sw_hardening_needed=self.sw_hardening_needed or other.sw_hardening_needed,
        )

    def check(self, status: str) -> None:
        """Raise TcbStatusRefused unless a platform with TCB ``status`` is accepted."""
        if status == TcbStatus.REVOKED:
            raise TcbStatusRefused("TCB status Revoked is always refused")
        needs = ALLOWANCES_NEEDED.get(status) if isinstance(status, str) else None
        if needs is None:
            # fail closed: a status we do not know may mean anything
            raise TcbStatusRefused(f"TCB status {show(status)} is unknown and refused")
        missing = [key for key in needs if not self._allowed(key)]
        if missing:
            raise TcbStatusRefused(
                f"TCB status {status} is not allowed (set {' and '.join(missing)} "
                f'to "on" to accept it)'
            )
