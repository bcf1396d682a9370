"""A simulated quote made in another process verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dcap_qvl

from teepsi.attestation.sim import (
    SimPlatform,
    is_simulated_quote,
)
from tests.unit.test_sim_platform import (
    _verify,
)

SRC_DIR = Path(__file__).resolve().parents[2] / "src"


def test_quote_made_in_another_process_verifies() -> None:
    script = (
        "import sys\n"
        "from teepsi.attestation.evidence import EnclaveIdentity\n"
        "from teepsi.attestation.sim import SimEvidenceProvider\n"
        "p = SimEvidenceProvider(EnclaveIdentity(bytes(32), bytes(range(32)), 1, 1))\n"
        "q = p.quote(bytes(range(64)))\n"
        "sys.stdout.buffer.write(q)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(SRC_DIR))
    quote = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, env=env, timeout=60
    ).stdout
    assert is_simulated_quote(quote)
    report = _verify(quote, SimPlatform())
    assert report.status == "UpToDate"
    assert dcap_qvl.parse_quote(quote).report.report_data == bytes(range(64))
