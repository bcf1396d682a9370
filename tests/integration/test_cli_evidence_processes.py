"""The evidence commands against a fake PCCS on loopback and as python -m teepsi."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.fake_pccs import FakePccs
from tests.unit.test_cli_evidence import (
    DCAP,
    GRAMINE_CERT,
    GRAMINE_MR_ENCLAVE,
    PINNED,
    _sim_files,
    run,
)


def test_fetch_then_verify_offline(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote = DCAP / "sgx_quote"
    saved = tmp_path / "collateral.json"
    with FakePccs((DCAP / "sgx_quote_collateral.json").read_text()) as pccs:
        code, out, _ = run(
            capsys, "fetch-collateral", str(quote), "--pccs-url", pccs.url, "-o", str(saved)
        )
    assert code == 0
    assert out["fmspc"] == "00A067110000" and out["pck_ca"] == "processor"
    assert out["output"] == str(saved) and out["tls_verified"] is True
    assert out["verifies_now"] is False and "CrlExpired" in out["reason_now"]
    code, out, _ = run(
        capsys,
        "verify-quote",
        str(quote),
        "--collateral",
        str(saved),
        "--at",
        PINNED,
        "--allow-hw-config",
        "--allow-sw-hardening",
    )
    assert code == 0 and out["status"] == "ConfigurationAndSWHardeningNeeded"


def test_fetch_sim_to_stdout(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path)
    with FakePccs(collateral.read_text()) as pccs:
        code, out, _ = run(
            capsys, "fetch-collateral", str(quote), "--pccs-url", pccs.origin, "-o", "-"
        )
    assert code == 0 and json.loads(collateral.read_text()) == out


def test_fetch_uses_qcnl_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path)
    saved = tmp_path / "fetched.json"
    conf = tmp_path / "sgx_default_qcnl.conf"
    with FakePccs(collateral.read_text(), tls=True) as pccs:
        conf.write_text(f"PCCS_URL={pccs.url}\nUSE_SECURE_CERT=FALSE\n")
        args = ("fetch-collateral", str(quote), "--qcnl-config", str(conf), "-o", str(saved))
        code, out, _ = run(capsys, *args)
        assert code == 0 and out["tls_verified"] is False and out["verifies_now"] is True
        conf.write_text(f"PCCS_URL={pccs.url}\nUSE_SECURE_CERT=TRUE\n")
        code, out, err = run(capsys, *args)
        assert code == 1 and "certificate verify failed" in err
        code, out, _ = run(capsys, *args, "--insecure-pccs-tls")
        assert code == 0


def test_fetch_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    quote, collateral = _sim_files(tmp_path)
    out_file = str(tmp_path / "c.json")
    pccs = FakePccs(collateral.read_text())
    url = pccs.url
    pccs.close()
    code, _, err = run(capsys, "fetch-collateral", str(quote), "--pccs-url", url, "-o", out_file)
    assert code == 1 and "cannot reach PCCS" in err and err.count("\n") == 1
    code, _, err = run(
        capsys, "fetch-collateral", str(quote), "--pccs-url", "pccs:8081", "-o", out_file
    )
    assert code == 2 and "not an http:// or https:// URL" in err
    code, _, err = run(
        capsys,
        "fetch-collateral",
        str(quote),
        "--qcnl-config",
        str(tmp_path / "absent.conf"),
        "-o",
        out_file,
    )
    assert code == 2 and "absent.conf: cannot read" in err
    with FakePccs(collateral.read_text()) as pccs:
        pccs.fail_status = 404
        code, _, err = run(
            capsys, "fetch-collateral", str(quote), "--pccs-url", pccs.url, "-o", out_file
        )
    assert code == 1 and "HTTP 404" in err
    assert not Path(out_file).exists()


def _registered() -> bool:
    probe = subprocess.run(
        [sys.executable, "-m", "teepsi", "verify-quote", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return probe.returncode == 0


def test_through_python_m_teepsi() -> None:
    if not _registered():
        pytest.skip("teepsi.cli does not register the evidence commands yet")
    base = [
        sys.executable,
        "-m",
        "teepsi",
        "verify-quote",
        str(DCAP / "sgx_quote"),
        "--collateral",
        str(DCAP / "sgx_quote_collateral.json"),
        "--at",
        PINNED,
        "--allow-hw-config",
    ]
    rejected = subprocess.run(base, capture_output=True, text=True, check=False)
    assert rejected.returncode == 1
    assert json.loads(rejected.stdout)["accepted"] is False
    accepted = subprocess.run(
        [*base, "--allow-sw-hardening"], capture_output=True, text=True, check=False
    )
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["accepted"] is True
    inspected = subprocess.run(
        [sys.executable, "-m", "teepsi", "inspect-cert", str(GRAMINE_CERT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert inspected.returncode == 0
    assert json.loads(inspected.stdout)["quote"]["mr_enclave"] == GRAMINE_MR_ENCLAVE
