"""The one base class of every error the teepsi library raises.

Callers catch :class:`TeepsiError` to handle any refusal or bad input from teepsi in one
place; each module's own error classes derive from it (and, where that helps callers, from
the matching built-in too, e.g. ``ValueError``).
"""

from __future__ import annotations


class TeepsiError(Exception):
    """Base of every error teepsi raises on purpose; its message is one line for a user."""
