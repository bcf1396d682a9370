"""Challenge nonces: issuing stores nothing, so nobody can evict another party's nonce;
a nonce is single use, bound to its job and party, and expires; a full redeemed set
refuses replays, never a fresh nonce."""

from __future__ import annotations

import pytest

from teepsi.server.challenges import NONCE_BYTES, ChallengeStore
from teepsi.server.errors import ErrorKind, ServiceError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def refused(store: ChallengeStore, nonce: bytes, job: str = "j", party: str = "a") -> str:
    with pytest.raises(ServiceError) as err:
        store.redeem(nonce, job, party)
    assert err.value.kind is ErrorKind.PERMISSION_DENIED
    return err.value.message


def test_a_challenge_flood_does_not_evict_an_honest_nonce():
    """Before: 10k GetChallenge calls by anyone evicted the honest party's nonce."""
    store = ChallengeStore()
    honest = store.issue("job", "alice")
    for n in range(20_000):
        store.issue("job", f"flood{n}")
    store.redeem(honest, "job", "alice")
    assert store.redeemed_count() == 1  # the flood left nothing behind


def test_nonce_is_single_use_bound_and_expiring():
    clock = Clock()
    store = ChallengeStore(ttl_seconds=60, clock=clock)
    nonce = store.issue("j", "a")
    assert len(nonce) == NONCE_BYTES
    assert "request a new challenge" in refused(store, store.issue("j", "b"))  # other party
    assert "request a new challenge" in refused(store, store.issue("k", "a"))  # other job
    # "j" + "ab" and "ja" + "b" are different bindings.
    assert "request a new challenge" in refused(store, store.issue("ja", "b"), "j", "ab")
    store.redeem(nonce, "j", "a")
    refused(store, nonce)  # replay
    # A forged expiry (pushed into the future) breaks the MAC.
    late = store.issue("j", "a")
    forged = late[:16] + (2**63).to_bytes(8, "big") + late[24:]
    refused(store, forged)
    refused(store, late[:-1])  # truncated
    refused(store, b"")  # absent
    clock.now += 61
    refused(store, late)  # expired
    # Another server (another key) issued it: unknown here.
    refused(store, ChallengeStore(clock=clock).issue("j", "a"))


def test_redeemed_set_holds_nonces_only_until_they_expire():
    clock = Clock()
    store = ChallengeStore(ttl_seconds=60, clock=clock)
    for _ in range(5):
        store.redeem(store.issue("j", "a"), "j", "a")
    assert store.redeemed_count() == 5
    clock.now += 61
    store.redeem(store.issue("j", "a"), "j", "a")
    assert store.redeemed_count() == 1


def test_a_full_redeemed_set_refuses_replays_but_not_fresh_nonces():
    clock = Clock()
    store = ChallengeStore(ttl_seconds=60, redeemed_capacity=3, clock=clock)
    used = []
    for _ in range(6):
        nonce = store.issue("j", "a")
        store.redeem(nonce, "j", "a")
        used.append(nonce)
        clock.now += 1
    assert store.redeemed_count() == 3
    # Every nonce ever redeemed is still refused, the forgotten ones by their expiry.
    for nonce in used:
        refused(store, nonce)
    # A nonce issued now (after the ones forgotten) is accepted.
    store.redeem(store.issue("j", "a"), "j", "a")


def test_check_does_not_consume():
    store = ChallengeStore()
    nonce = store.issue("j", "a")
    store.check(nonce, "j", "a")
    store.check(nonce, "j", "a")
    store.redeem(nonce, "j", "a")
    with pytest.raises(ServiceError):
        store.check(nonce, "j", "a")
