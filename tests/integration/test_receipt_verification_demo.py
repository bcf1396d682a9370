"""The contract demo's receipts, verified through the one path."""

from __future__ import annotations


def test_contract_demo_verifies_every_receipt_through_the_path() -> None:
    """The demo's receipts carry their collateral; verified under the simulated root."""
    import subprocess

    from tests.support.processes import teepsi_cmd

    run = subprocess.run(teepsi_cmd("demo", "--contract"), capture_output=True, timeout=300)
    out = run.stdout.decode()
    assert run.returncode == 0, out + run.stderr.decode()
    assert out.count("[receipt verified]") == 3 and "RECEIPT INVALID" not in out
