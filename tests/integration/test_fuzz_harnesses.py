"""The atheris harnesses of fuzz/ (issue 6): bounded runs in CI, and their seed corpora.

Each harness runs for ``TEEPSI_FUZZ_RUNS`` iterations (10,000 by default, at most 60 s) with a
fixed libFuzzer seed, starting from its committed corpus, and must exit 0: any exception
other than the target's documented error type is a crash. Known issues that are reported
but not fixed yet (fuzz/_support.py, each with a strict-xfail test in
test_fuzz_regressions.py) are tolerated, so that this test guards against *new* crashes.
Long runs are a separate command: see docs/fuzzing.md.

atheris is a dev dependency: without it these runs skip locally and FAIL when CI=true.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
CORPUS = FUZZ / "corpus"
HARNESSES = ("ratls", "quote", "policy", "spec", "upload", "receipt", "audit")
RUNS = int(os.environ.get("TEEPSI_FUZZ_RUNS", "10000"))
MAX_SECONDS = 60
SEED = int(os.environ.get("TEEPSI_FUZZ_SEED", "1"))
MAX_CORPUS_BYTES = 100 * 1024


def _require_atheris() -> None:
    try:
        import atheris  # noqa: F401
    except ImportError as exc:
        message = (
            f"atheris cannot be imported ({exc}): it is a dev dependency, install it with "
            "`pip install -e '.[dev]'` (or `pip install atheris`)"
        )
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(message)
        pytest.skip(message)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    env["TEEPSI_FUZZ_TOLERATE_KNOWN"] = "1"
    env["PYTHONHASHSEED"] = "0"  # with -seed, the same run every time
    return env


@pytest.mark.parametrize("name", HARNESSES)
def test_bounded_fuzz_run(name: str, tmp_path: Path) -> None:
    _require_atheris()
    work = tmp_path / "work"  # new inputs go here, never into the committed corpus
    artifacts = tmp_path / "artifacts"
    work.mkdir()
    artifacts.mkdir()
    command = [
        sys.executable,
        str(FUZZ / f"fuzz_{name}.py"),
        f"-runs={RUNS}",
        f"-max_total_time={MAX_SECONDS}",
        f"-seed={SEED}",
        "-timeout=30",
        f"-artifact_prefix={artifacts}/",
        str(work),
        str(CORPUS / name),
    ]
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=MAX_SECONDS + 120,
    )
    output = proc.stdout + proc.stderr
    crashes = [p for p in artifacts.iterdir() if not p.name.startswith("known-")]
    detail = "".join(
        f"\nreproducer {p.name} ({p.stat().st_size} bytes): {p.read_bytes()[:200]!r}"
        for p in crashes
    )
    assert proc.returncode == 0, (
        f"fuzz_{name} crashed (exit {proc.returncode}); save the reproducer under "
        f"fuzz/crashes/{name}/ and add a regression test{detail}\n{output[-6000:]}"
    )
    done = re.search(r"Done (\d+) runs", output)
    assert done is not None, output[-3000:]
    # Stopping at -max_total_time instead is fine on a slow machine, but say so.
    print(f"fuzz_{name}: {done.group(0)}", file=sys.stderr)


# --- the seed corpora (no atheris needed) --------------------------------------------------


def test_seed_corpora_are_committed_and_small() -> None:
    total = 0
    for name in HARNESSES:
        seeds = [p for p in (CORPUS / name).iterdir() if p.is_file()]
        assert seeds, f"fuzz/corpus/{name} is empty: run python fuzz/make_corpus.py {name}"
        total += sum(p.stat().st_size for p in seeds)
    assert total < MAX_CORPUS_BYTES, f"seed corpora hold {total} bytes; keep them small"


def test_make_corpus_writes_the_committed_seeds(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(FUZZ / "make_corpus.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env=_env(),
        timeout=120,
    )
    for name in HARNESSES:
        made = sorted(p.name for p in (tmp_path / name).iterdir())
        committed = sorted(p.name for p in (CORPUS / name).iterdir())
        assert made == committed, f"fuzz/corpus/{name} is stale: run fuzz/make_corpus.py"


def test_seeds_reach_the_accepting_paths() -> None:
    """The seeds start the fuzzer deep inside each parser, not at its first refusal."""
    from teepsi.attestation.policy import Policy
    from teepsi.attestation.quote import parse_quote
    from teepsi.attestation.ratls import _check_claims, _parse_certificate, extract_evidence
    from teepsi.attestation.sim import is_simulated_quote
    from teepsi.contract.audit import verify_audit_log
    from teepsi.contract.receipt import SignedReceipt
    from teepsi.contract.spec import JobSpec
    from teepsi.protocol import teepsi_pb2 as pb
    from teepsi.server.streams import decode_upload

    certificates = [p for p in (CORPUS / "ratls").iterdir() if p.suffix != ".cbor"]
    judged_at = datetime(2024, 1, 2, tzinfo=UTC)  # fuzz/fuzz_ratls.py's JUDGED_AT
    sources = {extract_evidence(p.read_bytes(), at=judged_at).source for p in certificates}
    assert sources == {"tcg-dice", "legacy"}
    # the claims seed belongs to the small TCG certificate's key (the harness's second target)
    tcg = _parse_certificate((CORPUS / "ratls" / "small_tcg_p384.der").read_bytes())
    _check_claims((CORPUS / "ratls" / "claims_p384.cbor").read_bytes(), tcg.spki_der)
    assert parse_quote((CORPUS / "quote" / "sgx_quote").read_bytes())
    assert is_simulated_quote((CORPUS / "quote" / "sim_data_provider").read_bytes())
    assert is_simulated_quote((CORPUS / "quote" / "sim_tdx_server").read_bytes())
    assert parse_quote((CORPUS / "quote" / "tdx_quote").read_bytes()).report_body.tee == "TDX"
    for path in (CORPUS / "policy").iterdir():
        Policy.load(path)
    for path in (CORPUS / "spec").iterdir():
        data = path.read_bytes()
        if path.name == "canonical.json":
            JobSpec.from_canonical(data)
        else:
            JobSpec.parse(data, source=path.name, fmt=path.suffix.removeprefix("."))
    for path in (CORPUS / "receipt").iterdir():
        SignedReceipt.from_json(path.read_bytes())
    signed = {p.name: verify_audit_log(p).signed_entries for p in (CORPUS / "audit").iterdir()}
    assert signed["signed.jsonl"] > 0 and signed["unsigned.jsonl"] == 0
    for path in (CORPUS / "upload").glob("chunk_*"):
        chunk = pb.UploadChunk.FromString(path.read_bytes())
        decode_upload(chunk.records, chunk.record_count, chunk.sequence)


def test_every_finding_has_a_regression_test_and_a_doc_entry() -> None:
    support = (FUZZ / "_support.py").read_text()
    regressions = (ROOT / "tests" / "unit" / "test_fuzz_regressions.py").read_text()
    docs = (ROOT / "docs" / "fuzzing.md").read_text()
    found = {k.upper() for k in re.findall(r"def test_(f\d+)_", regressions)}
    assert found, "no regression tests of fuzzing findings"
    for key in sorted(found | set(re.findall(r'KnownIssue\(\s*"(F\d+)"', support))):
        assert f"def test_{key.lower()}_" in regressions, f"{key} has no regression test"
        assert f"| {key} |" in docs, f"{key} is not in docs/fuzzing.md's table of findings"
