"""The TDX simulation through the teepsi command: measure, demo and refusals."""

from __future__ import annotations

import subprocess
from pathlib import Path

from teepsi.attestation.measure import sim_td_identity
from teepsi.attestation.policy import (
    Policy,
)
from tests.support.processes import teepsi_cmd


def test_measure_sim_tee_tdx_lists_the_simulated_vm(tmp_path: Path) -> None:
    out = tmp_path / "tdx.json"
    subprocess.run(
        teepsi_cmd("measure", "--attestation", "sim", "--sim-tee", "tdx", "-o", str(out)),
        check=True,
    )
    policy = Policy.load(out)
    assert policy.entries == ()
    assert [e.mr_td for e in policy.tdx_entries] == [sim_td_identity().mr_td]
    assert policy.check_td(sim_td_identity(), "UpToDate")


def test_sim_tee_needs_attestation_sim(tmp_path: Path) -> None:
    run = subprocess.run(
        teepsi_cmd(
            "server", "--attestation", "gramine", "--sim-tee", "tdx", "--no-client-attestation"
        ),
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "teepsi server: error: --sim-tee tdx: only with --attestation sim (--attestation "
        "gramine uses the real TEE it names)"
    ]


def test_demo_tee_tdx_prints_car_cat_train() -> None:
    run = subprocess.run(
        teepsi_cmd("demo", "--tee", "tdx"), capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr
    assert "SIMULATED TDX attestation" in run.stdout
    results = [line for line in run.stdout.splitlines() if line.startswith("data_provider")]
    assert len(results) == 3
    assert all(line.endswith("-> car, cat, train") for line in results)
