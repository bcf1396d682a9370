"""Looks into a JobRegistry that only tests need (the server itself never asks)."""

from __future__ import annotations

from teepsi.server.jobs import JobRegistry


def live_jobs(registry: JobRegistry) -> int:
    """How many jobs the registry holds now, from the counts the metrics read."""
    return sum(registry.counts().by_phase.values())


def expire_due(registry: JobRegistry) -> None:
    """What the reaper does at a deadline, at once: for tests whose clock jumped past it
    (the reaper sleeps by real time until the deadline it last computed)."""
    with registry._lock:
        registry._expire_due_locked()
