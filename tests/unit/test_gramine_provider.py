"""GramineEvidenceProvider against a fake /dev/attestation directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from teepsi.attestation.evidence import EvidenceError
from teepsi.attestation.gramine import DEFAULT_ROOT, GramineEvidenceProvider
from teepsi.attestation.ratls import RaTlsError, create_certificate

QUOTE = b"\x03\x00" + bytes(998)


def fake_root(tmp_path: Path, attestation_type: str = "dcap", quote: bytes = QUOTE) -> Path:
    root = tmp_path / "attestation"
    root.mkdir()
    (root / "attestation_type").write_text(attestation_type)
    (root / "user_report_data").write_bytes(bytes(64))
    (root / "quote").write_bytes(quote)
    return root


def test_identity() -> None:
    assert GramineEvidenceProvider.name == "gramine"
    assert GramineEvidenceProvider.simulated is False
    assert GramineEvidenceProvider().root == DEFAULT_ROOT == Path("/dev/attestation")


def test_writes_report_data_then_reads_quote(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    report_data = bytes(range(64))
    assert GramineEvidenceProvider(root).quote(report_data) == QUOTE
    assert (root / "user_report_data").read_bytes() == report_data


def test_attestation_type_with_newline_accepted(tmp_path: Path) -> None:
    root = fake_root(tmp_path, attestation_type="dcap\n")
    assert GramineEvidenceProvider(root).quote(bytes(64)) == QUOTE


def test_missing_root(tmp_path: Path) -> None:
    provider = GramineEvidenceProvider(tmp_path / "nowhere")
    with pytest.raises(EvidenceError, match="not running inside Gramine-SGX") as info:
        provider.quote(bytes(64))
    assert "does not exist" in str(info.value)
    assert 'sgx.remote_attestation = "dcap"' in str(info.value)


def test_missing_attestation_type_file(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "attestation_type").unlink()
    with pytest.raises(EvidenceError, match=r"cannot read .*attestation_type"):
        GramineEvidenceProvider(root).quote(bytes(64))


def test_attestation_type_none(tmp_path: Path) -> None:
    root = fake_root(tmp_path, attestation_type="none")
    with pytest.raises(EvidenceError, match="attestation type is 'none'") as info:
        GramineEvidenceProvider(root).quote(bytes(64))
    assert "\n" not in str(info.value)
    assert 'sgx.remote_attestation = "dcap"' in str(info.value)
    # Refused before touching the device.
    assert (root / "user_report_data").read_bytes() == bytes(64)


@pytest.mark.parametrize("size", [0, 32, 63, 65])
def test_wrong_report_data_length(tmp_path: Path, size: int) -> None:
    root = fake_root(tmp_path)
    with pytest.raises(EvidenceError, match=f"must be 64 bytes, got {size}"):
        GramineEvidenceProvider(root).quote(bytes(size))


def test_empty_quote(tmp_path: Path) -> None:
    root = fake_root(tmp_path, quote=b"")
    with pytest.raises(EvidenceError, match="returned no quote"):
        GramineEvidenceProvider(root).quote(bytes(64))


def test_missing_quote_file(tmp_path: Path) -> None:
    root = fake_root(tmp_path)
    (root / "quote").unlink()
    with pytest.raises(EvidenceError, match=r"cannot read .*quote"):
        GramineEvidenceProvider(root).quote(bytes(64))


def test_certificate_creation_notices_a_quote_that_ignores_report_data(tmp_path: Path) -> None:
    # A plain file cannot regenerate the quote for new report_data, as Gramine does, so
    # the quote read back does not carry the key's hash; create_certificate must say so.
    provider = GramineEvidenceProvider(fake_root(tmp_path))
    with pytest.raises(RaTlsError, match="'gramine' returned a quote without the requested"):
        create_certificate(provider)
