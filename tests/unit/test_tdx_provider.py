"""The ``tdx`` evidence provider over configfs-tsm, against fake report trees.

The fake stands in for the kernel only where a plain directory cannot: when the
provider creates its report directory, the fake fills it with the attribute files the
kernel would show after one write to ``inblob`` (``provider``, ``generation``,
``outblob``). Everything the provider reads and checks is real file I/O.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from teepsi.attestation.evidence import EvidenceError, Role, tdx_report_data
from teepsi.attestation.measure import sim_td_identity
from teepsi.attestation.peer import PeerVerifier
from teepsi.attestation.policy import policy_for
from teepsi.attestation.providers import make_provider
from teepsi.attestation.ratls import create_certificate
from teepsi.attestation.sim import SimTdxPlatform
from teepsi.attestation.tdx import MAX_QUOTE_SIZE, TdxEvidenceProvider

REPORT_DATA = bytes(range(64))


class FakeTsm(TdxEvidenceProvider):
    """configfs-tsm as a TDX guest kernel shows it, in a plain directory tree.

    ``outblob`` None makes a real simulated TDX quote over what the provider asks for.
    """

    def __init__(
        self,
        root: Path,
        *,
        provider: str = "tdx_guest",
        generation: str = "1",
        outblob: bytes | None = None,
        role: Role = Role.SERVER,
        dmi_root: Path | None = None,
    ) -> None:
        super().__init__(role, root, dmi_root=dmi_root or root / "no-dmi")
        self.fake_provider = provider
        self.fake_generation = generation
        self.fake_outblob = outblob
        self.platform = SimTdxPlatform()
        self.entries: list[Path] = []
        self.requested: list[bytes] = []

    def _new_report_dir(self) -> Path:
        entry = super()._new_report_dir()
        self.entries.append(entry)
        (entry / "provider").write_text(self.fake_provider + "\n")
        (entry / "generation").write_text(self.fake_generation + "\n")
        (entry / "inblob").write_bytes(b"")
        return entry

    def _read(self, path: Path, limit: int) -> bytes:
        # The kernel makes outblob from what inblob holds when it is read.
        if path.name == "outblob" and not path.exists():
            inblob = (path.parent / "inblob").read_bytes()
            self.requested.append(inblob)
            blob = self.fake_outblob
            if blob is None:
                blob = self.platform.quote(sim_td_identity(), inblob)
            path.write_bytes(blob)
        return super()._read(path, limit)


@pytest.fixture
def tsm_root(tmp_path: Path) -> Path:
    root = tmp_path / "tsm" / "report"
    root.mkdir(parents=True)
    return root


def _error(provider: TdxEvidenceProvider) -> str:
    with pytest.raises(EvidenceError) as caught:
        provider.quote(REPORT_DATA)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_quote_from_configfs_tsm_binds_the_role(tsm_root: Path) -> None:
    fake = FakeTsm(tsm_root, role=Role.DATA_PROVIDER)
    quote = fake.quote(REPORT_DATA)
    # What went into inblob is the role-bound report data, exactly 64 bytes.
    assert fake.requested == [tdx_report_data(Role.DATA_PROVIDER, REPORT_DATA)]
    assert quote.startswith(b"\x04\x00\x02\x00\x81\x00\x00\x00")
    # One directory per request.
    fake.quote(REPORT_DATA)
    assert len({entry.name for entry in fake.entries}) == 2
    assert all(entry.parent == tsm_root for entry in fake.entries)


def test_configfs_tsm_certificate_verifies_as_the_server(tsm_root: Path) -> None:
    fake = FakeTsm(tsm_root, role=Role.SERVER)
    cert = create_certificate(fake)
    policy = policy_for([], [("vm", sim_td_identity())])
    peer, _ = PeerVerifier(policy, allow_simulated=True).verify_certificate(
        cert.certificate_der, fake.platform.collateral_json(), role=Role.SERVER
    )
    assert peer.role is Role.SERVER


def test_missing_tree(tmp_path: Path) -> None:
    message = _error(TdxEvidenceProvider(Role.SERVER, tmp_path / "absent", dmi_root=tmp_path))
    assert message.startswith(f"{tmp_path / 'absent'} does not exist: configfs-tsm needs")
    assert "Linux 6.7" in message and "/dev/tdx_guest" in message


def test_azure_paravisor_vm_refused_with_its_reason(tmp_path: Path) -> None:
    dmi = tmp_path / "dmi"
    dmi.mkdir()
    (dmi / "sys_vendor").write_text("Microsoft Corporation\n")
    message = _error(TdxEvidenceProvider(Role.SERVER, tmp_path / "absent", dmi_root=dmi))
    assert "Azure confidential VM with a paravisor" in message and "vTPM" in message


def test_wrong_provider(tsm_root: Path) -> None:
    message = _error(FakeTsm(tsm_root, provider="sev_guest"))
    assert "configfs-tsm provider is 'sev_guest', not 'tdx_guest'" in message


def test_concurrent_writer_detected_by_generation(tsm_root: Path) -> None:
    message = _error(FakeTsm(tsm_root, generation="2"))
    assert "changed while the quote was made (generation 2, expected 1)" in message


def test_empty_outblob(tsm_root: Path) -> None:
    assert _error(FakeTsm(tsm_root, outblob=b"")).endswith("outblob returned no quote")


def test_oversized_outblob(tsm_root: Path) -> None:
    message = _error(FakeTsm(tsm_root, outblob=b"\x04" * (MAX_QUOTE_SIZE + 1)))
    assert f"outblob returned more than {MAX_QUOTE_SIZE} bytes" in message


def test_outblob_for_other_report_data(tsm_root: Path) -> None:
    other = SimTdxPlatform().quote(sim_td_identity(), bytes(64))
    assert "quote for other report data" in _error(FakeTsm(tsm_root, outblob=other))


def test_garbage_outblob(tsm_root: Path) -> None:
    assert "is not a usable quote" in _error(FakeTsm(tsm_root, outblob=b"\x00" * 1000))


def test_unwritable_tree(tsm_root: Path) -> None:
    tsm_root.chmod(0o500)
    try:
        if _can_write(tsm_root):
            pytest.skip("running as root: directory permissions do not apply")
        message = _error(TdxEvidenceProvider(Role.SERVER, tsm_root))
        assert "cannot create the configfs-tsm report directory" in message
    finally:
        tsm_root.chmod(0o700)


def _can_write(path: Path) -> bool:
    try:
        (path / "probe").mkdir()
    except OSError:
        return False
    (path / "probe").rmdir()
    return True


def test_make_provider_tdx(tsm_root: Path) -> None:
    provider = make_provider("tdx", Role.DATA_PROVIDER, tsm_root=tsm_root)
    assert isinstance(provider, TdxEvidenceProvider)
    assert (provider.role, provider.root, provider.simulated) == (
        Role.DATA_PROVIDER,
        tsm_root,
        False,
    )
