"""What README.md and docs/ say about behaviour is what the code does."""

from __future__ import annotations

import dataclasses
import json
import re
import textwrap
from pathlib import Path

import polars as pl
import pytest

from teepsi.attestation.evidence import EnclaveIdentity
from teepsi.attestation.policy import Policy, PolicyViolation, policy_for
from teepsi.contract.normalization import Normalization
from teepsi.contract.receipt import PartyEntry, Receipt
from teepsi.engine.records import normalized_expr

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CONTRACTS = (ROOT / "docs" / "contracts.md").read_text()

#: How the docs name each field of a receipt, which every party of a job receives.
RECEIPT_FIELD_WORDS = {
    "spec_sha256": "spec digest",
    "job_id": "job id",
    "parties": "every party's name",
    "name": "every party's name",
    "items": "item",
    "set_sha256": "set digest",
    "output": "output kind",
    "released": "threshold was met",
    "result_size": "result size",
    "result_sha256": "result digest",
    "issued_at": "time",
    "certificate_sha256": "certificate",
    "audit_head": "audit log",
    "tee": "kind of TEE signed",
}


def lowered(*keys: str) -> list[str]:
    spec = Normalization.parse("casefold")
    frame = pl.DataFrame({"k": list(keys)})
    return frame.select(normalized_expr(spec, pl.col("k")))["k"].to_list()


def test_casefold_is_lower_casing_as_the_docs_say() -> None:
    # lower-casing, no case folding: these stay apart, as README and docs/contracts.md say
    assert lowered("Straße", "STRASSE") == ["straße", "strasse"]
    assert lowered("ﬁx") == ["ﬁx"]
    assert lowered("ΟΔΟΣ") == ["οδος"]  # final sigma
    assert lowered("I") == ["i"]  # no Turkish locale rule
    # and it is the mapping of Python's str.lower() for Latin, Greek and Cyrillic text
    sample = [chr(c) for c in range(0x20, 0x530)]
    assert lowered(*sample) == [c.lower() for c in sample]
    for doc in (README, CONTRACTS):
        assert "not Python's\n  `str.casefold()`" in doc or "not `str.casefold()`" in doc


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    following = re.search(r"\n#{2,3} ", text[start + len(heading) :])
    return text[start : start + len(heading) + (following.start() if following else len(text))]


def test_what_a_party_learns_names_every_receipt_field() -> None:
    """A receipt goes to every party: each of its fields is something every party learns,
    so the "what each party learns" text of both docs must name it."""
    fields = {f.name for f in dataclasses.fields(Receipt)} | {
        f.name for f in dataclasses.fields(PartyEntry)
    }
    assert fields == set(RECEIPT_FIELD_WORDS), "a receipt field the docs do not describe"
    texts = {
        "docs/contracts.md": section(CONTRACTS, "## What each party learns"),
        "README.md": section(README, "What each party learns:"),
    }
    for where, text in texts.items():
        flat = " ".join(text.split())
        for field, words in RECEIPT_FIELD_WORDS.items():
            assert words in flat, f"{where}: what a party learns omits the receipt's {field}"
    security = " ".join(section(README, "## Security model, plainly").split())
    assert "every party's name and how many records each uploaded" in security


def test_readme_names_only_paths_that_exist() -> None:
    for path in set(re.findall(r"`((?:tests|docs|deploy|src|shared|bench)/[\w./-]*)`", README)):
        assert (ROOT / path).exists(), path


OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def fenced(text: str, language: str) -> list[str]:
    """The code blocks in ``language``, indented ones (in a list item) dedented."""
    blocks = re.findall(rf"^( *)```{language}\n(.*?)\n\1```", text, re.DOTALL | re.MULTILINE)
    return [textwrap.dedent(indent + body) for indent, body in blocks]


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_operations_links_reach_files_and_headings() -> None:
    for target in re.findall(r"\]\(([^)\s]+)\)", OPERATIONS):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        doc = ROOT / "docs" / path if path else ROOT / "docs" / "operations.md"
        assert doc.is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.MULTILINE)
            assert anchor in {github_anchor(h) for h in headings}, target


def test_operations_prometheus_examples_parse_and_use_the_documented_metrics() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the examples (dev dependency)")
    scrape, rules = (yaml.safe_load(block) for block in fenced(OPERATIONS, "yaml"))
    assert scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    table = OPERATIONS.split("## Metrics")[1].split("```yaml")[0]
    documented = set(re.findall(r"`(teepsi_[a-z_]+)", table))
    alerts = {rule["alert"]: rule["expr"] for rule in rules["groups"][0]["rules"]}
    # job failures, refusals, budget near full: each has its alert
    assert {"TeepsiJobsFailing", "TeepsiRefusals", "TeepsiMemoryBudgetNearlyFull"} <= set(alerts)
    for name, expr in alerts.items():
        for metric in re.findall(r"\b(teepsi_[a-z_]+)", expr):
            assert metric in documented, (name, metric)


def test_operations_upgrade_policy_accepts_old_and_new_builds_during_the_change() -> None:
    """The two-entry `sgx_mrs` of the upgrade section, with real values for its placeholders,
    is a policy that accepts both builds; without the old entry the old build is refused."""
    (fragment,) = fenced(OPERATIONS, "json")
    signer = bytes(range(32))
    old, new = (
        EnclaveIdentity(b"\x01" * 32, signer, 1, 1),
        EnclaveIdentity(b"\x02" * 32, signer, 1, 1),
    )
    text = (
        fragment.replace("<old 64 hex>", old.mr_enclave.hex())
        .replace("<new 64 hex>", new.mr_enclave.hex())
        .replace("<64 hex>", signer.hex())
    )
    # the flags of a policy teepsi writes itself, around the page's entries
    flags = {k: v for k, v in policy_for([("old", old)]).to_dict().items() if k != "sgx_mrs"}
    during = json.loads("{" + text + "}") | flags
    policy = Policy.from_dict(during, source="operations.md")
    assert policy.check(old, "UpToDate").mr_enclave == old.mr_enclave
    assert policy.check(new, "UpToDate").mr_enclave == new.mr_enclave
    after = during | {"sgx_mrs": during["sgx_mrs"][1:]}
    Policy.from_dict(after).check(new, "UpToDate")
    with pytest.raises(PolicyViolation):
        Policy.from_dict(after).check(old, "UpToDate")
