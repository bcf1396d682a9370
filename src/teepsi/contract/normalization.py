"""Key normalisation as a job names it: the options, their parsing and canonical form.

Every party of a job must canonicalise keys the same way, so the job spec names the
options and the server compares them. This module is the vocabulary only (no numpy, no
polars), so that contracts can check a spec without loading the engine; the engine
applies the options to key columns (:func:`teepsi.engine.records.normalized_expr`).
"""

from __future__ import annotations

from dataclasses import dataclass

from teepsi.errors import TeepsiError
from teepsi.jsontext import show

#: Characters the ``trim`` option strips from both ends (ASCII whitespace).
TRIM_CHARS = " \t\r\n\x0b\x0c"

#: The options, in their canonical order.
NORMALIZATION_OPTIONS = ("trim", "casefold", "nfc")


class NormalizationError(TeepsiError, ValueError):
    """An unknown normalisation option."""


@dataclass(frozen=True)
class Normalization:
    """How a key is canonicalised before hashing; every party of a job must agree.

    * ``trim``: strip ASCII whitespace at both ends;
    * ``casefold``: Unicode lower-casing (polars' ``to_lowercase``, the mapping of Python's
      ``str.lower()``), not ``str.casefold()``: "ß" stays "ß", so "Straße" != "STRASSE";
    * ``nfc``: Unicode normalisation form C, so composed and decomposed accents match.
    """

    trim: bool = True
    casefold: bool = False
    nfc: bool = False

    @classmethod
    def parse(cls, spec: str) -> Normalization:
        """From "trim,casefold,nfc" (any subset, or "none")."""
        words = {w.strip() for w in spec.split(",") if w.strip()}
        if words == {"none"}:
            return cls(trim=False)
        unknown = words - set(NORMALIZATION_OPTIONS)
        if unknown:
            raise NormalizationError(
                # Shown, not echoed: a value may hold a newline (a message is one line).
                f"unknown normalisation {', '.join(show(w) for w in sorted(unknown))}: "
                f"use a comma-separated subset of {', '.join(NORMALIZATION_OPTIONS)}, or none"
            )
        return cls(trim="trim" in words, casefold="casefold" in words, nfc="nfc" in words)

    def canonical(self) -> str:
        """The canonical text form ("trim,casefold", "none"): what a job compares."""
        on = [name for name in NORMALIZATION_OPTIONS if getattr(self, name)]
        return ",".join(on) if on else "none"
