"""Rollback refusal: the newest collateral each platform has shown, kept and enforced.

Everything in collateral is signed under Intel's root, so relaying it through an
untrusted host is safe; what such a relay *can* do is replay older, genuine collateral,
which :class:`CollateralFreshness` refuses.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
from pathlib import Path

from teepsi.attestation.collateral.documents import (
    CollateralInfo,
    CollateralItem,
    describe_collateral,
)
from teepsi.attestation.collateral.errors import CollateralError, CollateralRollbackError
from teepsi.privatefile import write_private
from teepsi.timefmt import iso_utc

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
            "cannot tell where to keep collateral state (no HOME): name a state file"
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

    Call :meth:`check_and_record` only for a peer that was fully accepted (quote, binding, role,
    policy): recording anything earlier lets a refused caller poison the state.

    With ``state_path`` the state survives restarts: a small JSON file (mode 0600,
    written atomically), re-read and merged under a lock before each update, so
    processes sharing it never forget what another recorded. Thread-safe.
    """

    _STATE_VERSION = 2

    def __init__(self, state_path: str | Path | None = None, *, tolerance_seconds: int = 0) -> None:
        if tolerance_seconds < 0:
            raise CollateralError("tolerance_seconds must not be negative")
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

    def check_and_record(self, collateral_json: str, *, source: str) -> CollateralInfo:
        """Check (as :meth:`check`) and then remember this collateral's dates, atomically."""
        info = describe_collateral(collateral_json)
        self.check_and_record_info(info, source=source)
        return info

    def check_and_record_info(self, info: CollateralInfo, *, source: str) -> None:
        """:meth:`check_and_record` for collateral already described (parsed once)."""
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
