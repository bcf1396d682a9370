"""What README.md and docs/ say about behaviour is what the code does."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import polars as pl

from teepsi.contract.receipt import PartyEntry, Receipt
from teepsi.engine.keys import Normalization

ROOT = Path(__file__).resolve().parents[1]
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
}


def lowered(*keys: str) -> list[str]:
    spec = Normalization.parse("casefold")
    frame = pl.DataFrame({"k": list(keys)})
    return frame.select(spec.apply(pl.col("k")))["k"].to_list()


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
