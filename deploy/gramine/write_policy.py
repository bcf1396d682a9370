#!/usr/bin/env python3
"""Write the ``dynamic_config.json`` policies the teepsi enclaves measure, from signing outputs.

Nobody copies MRENCLAVE hex by hand: the Makefile calls this script with what Gramine's tools
print, and the result goes into the other role's manifest as a trusted (measured) file.

Why the two directions differ. A policy is a trusted file, so it is part of the MRENCLAVE of the
enclave that reads it. The data provider's policy pins the server's MRENCLAVE, so the data
provider's MRENCLAVE depends on the server's; the server's policy therefore cannot pin the data
provider's MRENCLAVE as well (each would have to be computed before the other). So:

* ``from-key`` (the server's policy for data providers): MRSIGNER of the signing key,
  ISV_PROD_ID 2 and ISV_SVN >= N; MRENCLAVE is not verified. Any enclave that key signs
  with ISV_PROD_ID 2 is accepted, which is SGX's own notion of "a later release of the same
  product". With an ephemeral key that is destroyed after the image build (the Dockerfiles'
  default), that is exactly the data-provider enclave of this build.
* ``from-sigstruct`` (the data provider's policy for the server): MRENCLAVE, MRSIGNER,
  ISV_PROD_ID 1 and ISV_SVN >= the server's, all from ``gramine-sgx-sigstruct-view
  --output-format json``. The data providers, whose sets the server sees, pin the exact code.
* ``check``: after both enclaves are signed, confirm that an enclave satisfies a policy.

Exit status: 0 success, 1 a check failed, 2 bad usage or input. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

ROLES = {"server": 1, "data-provider": 2}
ROLE_LABELS = {"server": "teepsi server", "data-provider": "teepsi data provider"}

SGX_RSA_BITS = 3072
SGX_RSA_EXPONENT = 3

_HEX64 = re.compile(r"[0-9a-f]{64}")


class PolicyInputError(Exception):
    """Bad input; exit status 2."""


class CheckFailed(Exception):
    """An enclave does not satisfy a policy; exit status 1."""


# ---- inputs --------------------------------------------------------------------------


def mr_signer_from_key(path: Path) -> str:
    """MRSIGNER of an SGX signing key: SHA-256 of the modulus as SIGSTRUCT stores it.

    SIGSTRUCT holds the 3072-bit modulus little-endian in 384 bytes; MRSIGNER is the SHA-256
    of those bytes (the same computation ``gramine-sgx-sigstruct-view`` prints).
    """
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
    except ImportError:  # pragma: no cover - cryptography is a teepsi dependency
        raise PolicyInputError("the Python package 'cryptography' is required") from None
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyInputError(f"{path}: cannot read: {exc.strerror}") from None
    public: object
    try:
        if b"PRIVATE KEY" in data:
            public = serialization.load_pem_private_key(data, password=None).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise PolicyInputError(f"{path}: not an unencrypted PEM RSA key ({exc})") from None
    if not isinstance(public, rsa.RSAPublicKey):
        raise PolicyInputError(f"{path}: not an RSA key")
    numbers = public.public_numbers()
    if public.key_size != SGX_RSA_BITS or numbers.e != SGX_RSA_EXPONENT:
        raise PolicyInputError(
            f"{path}: SGX needs an RSA-{SGX_RSA_BITS} key with exponent {SGX_RSA_EXPONENT}, "
            f"got RSA-{public.key_size} with exponent {numbers.e}"
        )
    modulus = numbers.n.to_bytes(SGX_RSA_BITS // 8, "little")
    return hashlib.sha256(modulus).hexdigest()


def _u16(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise PolicyInputError(f"{where}: expected an integer 0..65535, got {value!r}")
    return value


def load_sigstruct(path: Path) -> dict[str, object]:
    """Read ``gramine-sgx-sigstruct-view --output-format json`` output and validate it."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyInputError(f"{path}: cannot read: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PolicyInputError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise PolicyInputError(f"{path}: expected a JSON object")
    out: dict[str, object] = {}
    for key in ("mr_enclave", "mr_signer"):
        value = data.get(key)
        if not isinstance(value, str) or not _HEX64.fullmatch(value.lower()):
            raise PolicyInputError(f"{path}: {key}: expected 64 hex characters, got {value!r}")
        out[key] = value.lower()
    for key in ("isv_prod_id", "isv_svn"):
        out[key] = _u16(data.get(key), f"{path}: {key}")
    debug = data.get("debug_enclave")
    if not isinstance(debug, bool):
        raise PolicyInputError(f"{path}: debug_enclave: expected true or false, got {debug!r}")
    if debug:
        raise PolicyInputError(f"{path}: a DEBUG enclave: rebuild with sgx.debug = false")
    out["debug_enclave"] = debug
    return out


# ---- policies ------------------------------------------------------------------------


def _policy(entry: dict[str, object], verify_mr_enclave: bool, comment: str) -> dict[str, object]:
    on_off = {True: "on", False: "off"}
    return {
        "_comment": comment,
        "verify_mr_enclave": on_off[verify_mr_enclave],
        "verify_mr_signer": "on",
        "verify_isv_prod_id": "on",
        "verify_isv_svn": "on",
        "allow_outdated_tcb": "off",
        "allow_hw_config_needed": "off",
        "allow_sw_hardening_needed": "off",
        "sgx_mrs": [entry],
    }


def policy_from_key(mr_signer: str, role: str, min_isv_svn: int) -> dict[str, object]:
    """Accept any enclave of ``role`` signed by the key whose MRSIGNER is ``mr_signer``."""
    entry: dict[str, object] = {
        "name": f"{ROLE_LABELS[role]} (any enclave of this signer)",
        "mr_signer": mr_signer,
        "isv_prod_id": str(ROLES[role]),
        "isv_svn": str(min_isv_svn),
    }
    comment = (
        f"Generated by deploy/gramine/write_policy.py from-key: accepts {ROLE_LABELS[role]} "
        f"enclaves (ISV_PROD_ID {ROLES[role]}, ISV_SVN >= {min_isv_svn}) signed by MRSIGNER "
        f"{mr_signer}. MRENCLAVE is not pinned: the peer's policy pins this enclave's "
        "MRENCLAVE, and two enclaves cannot each contain the other's measurement."
    )
    return _policy(entry, verify_mr_enclave=False, comment=comment)


def policy_from_sigstruct(sig: dict[str, object], role: str) -> dict[str, object]:
    """Accept exactly the enclave ``sig`` describes (and later SVNs of the same build)."""
    expected = ROLES[role]
    if sig["isv_prod_id"] != expected:
        raise PolicyInputError(
            f"the sigstruct has ISV_PROD_ID {sig['isv_prod_id']}, but a {role} enclave has "
            f"ISV_PROD_ID {expected}"
        )
    entry: dict[str, object] = {
        "name": ROLE_LABELS[role],
        "mr_enclave": sig["mr_enclave"],
        "mr_signer": sig["mr_signer"],
        "isv_prod_id": str(sig["isv_prod_id"]),
        "isv_svn": str(sig["isv_svn"]),
    }
    comment = (
        "Generated by deploy/gramine/write_policy.py from-sigstruct (gramine-sgx-sigstruct-view "
        f"output): accepts exactly this {ROLE_LABELS[role]} enclave."
    )
    return _policy(entry, verify_mr_enclave=True, comment=comment)


def _flag(policy: dict[str, object], key: str) -> bool:
    value = policy.get(key)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise PolicyInputError(f"policy: {key}: expected on/off, got {value!r}")


def _entry_u16(entry: dict[str, object], field: str, where: str) -> int:
    value = entry.get(field)
    if isinstance(value, str) and value.isdigit() and len(value) <= 5:
        value = int(value)
    return _u16(value, f"{where}.{field}")


def check(sig: dict[str, object], policy: dict[str, object], role: str) -> str:
    """Return the name of the policy entry ``sig`` satisfies, or raise CheckFailed.

    The rules are teepsi's (``teepsi.attestation.policy``): any entry matching every enabled
    field; MRs and ISV_PROD_ID equal, ISV_SVN greater or equal.
    """
    if sig["isv_prod_id"] != ROLES[role]:
        raise CheckFailed(f"the enclave has ISV_PROD_ID {sig['isv_prod_id']}, not a {role}")
    entries = policy.get("sgx_mrs")
    if not isinstance(entries, list) or not entries:
        raise PolicyInputError("policy: sgx_mrs: expected a non-empty list")
    reasons = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise PolicyInputError(f"policy: sgx_mrs[{index}]: expected an object")
        where = f"policy: sgx_mrs[{index}]"
        problems = []
        for field in ("mr_enclave", "mr_signer"):
            if _flag(policy, f"verify_{field}") and str(entry.get(field, "")).lower() != sig[field]:
                problems.append(field)
        prod_id, svn = sig["isv_prod_id"], sig["isv_svn"]
        assert isinstance(prod_id, int) and isinstance(svn, int)
        if (
            _flag(policy, "verify_isv_prod_id")
            and _entry_u16(entry, "isv_prod_id", where) != prod_id
        ):
            problems.append("isv_prod_id")
        if _flag(policy, "verify_isv_svn") and svn < _entry_u16(entry, "isv_svn", where):
            problems.append("isv_svn")
        if not problems:
            return str(entry.get("name", f"sgx_mrs[{index}]"))
        reasons.append(f"sgx_mrs[{index}]: {', '.join(problems)} differ")
    raise CheckFailed("the enclave matches no policy entry (" + "; ".join(reasons) + ")")


def _validate_with_teepsi(policy: dict[str, object], where: str) -> None:
    """When teepsi is importable (it is in the images), parse the policy as the enclave will."""
    try:
        from teepsi.attestation.policy import Policy, PolicyError
    except ImportError:
        return
    try:
        Policy.from_dict(policy, source=where)
    except PolicyError as exc:  # pragma: no cover - would be a bug in this script
        raise PolicyInputError(f"teepsi refuses the generated policy: {exc}") from None


def write_json(path: Path, data: dict[str, object]) -> None:
    """Write ``data`` atomically (a reader never sees half a policy)."""
    text = json.dumps(data, indent=4) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---- command line --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="write_policy.py",
        description="Write teepsi dynamic_config.json policies from Gramine signing outputs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    key = sub.add_parser("from-key", help="accept any enclave of ROLE signed by KEY")
    key.add_argument("--key", required=True, type=Path, help="SGX signing key (PEM)")
    key.add_argument("--role", required=True, choices=sorted(ROLES))
    key.add_argument("--min-isv-svn", required=True, type=int, help="lowest ISV_SVN accepted")
    key.add_argument("-o", "--output", required=True, type=Path)

    sig = sub.add_parser("from-sigstruct", help="accept exactly the enclave a sigstruct describes")
    sig.add_argument(
        "--sigstruct",
        required=True,
        type=Path,
        help="output of gramine-sgx-sigstruct-view --output-format json",
    )
    sig.add_argument("--role", required=True, choices=sorted(ROLES))
    sig.add_argument("-o", "--output", required=True, type=Path)

    chk = sub.add_parser("check", help="does the enclave a sigstruct describes satisfy a policy?")
    chk.add_argument("--sigstruct", required=True, type=Path)
    chk.add_argument("--policy", required=True, type=Path)
    chk.add_argument("--role", required=True, choices=sorted(ROLES))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "from-key":
            svn = _u16(args.min_isv_svn, "--min-isv-svn")
            policy = policy_from_key(mr_signer_from_key(args.key), args.role, svn)
            _validate_with_teepsi(policy, str(args.output))
            write_json(args.output, policy)
        elif args.command == "from-sigstruct":
            policy = policy_from_sigstruct(load_sigstruct(args.sigstruct), args.role)
            _validate_with_teepsi(policy, str(args.output))
            write_json(args.output, policy)
        else:
            try:
                policy = json.loads(args.policy.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise PolicyInputError(
                    f"{args.policy}: cannot read a JSON policy ({exc})"
                ) from None
            if not isinstance(policy, dict):
                raise PolicyInputError(f"{args.policy}: expected a JSON object")
            name = check(load_sigstruct(args.sigstruct), policy, args.role)
            print(f"{args.sigstruct}: satisfies {args.policy} ({name})")
    except PolicyInputError as exc:
        print(f"write_policy.py {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CheckFailed as exc:
        print(f"write_policy.py check: {args.sigstruct}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
