"""The job lifecycle without gRPC: isolation, barriers, deadlines, cleanup."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from teepsi.contract.party_keys import generate_private_key, public_key_der
from teepsi.contract.spec import JobSpec, PartySpec
from teepsi.engine.intersect import (
    as_u128,
    intersect_records,
    is_strictly_increasing,
    records_sha256_per_salt,
    sorted_unique_records,
    split_u128,
    unsalted_records_sha256,
)
from teepsi.engine.records import hash_keys, records_to_bytes
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.jobs import JobRegistry
from teepsi.server.limits import JobCreator, Limits
from tests.support.registry import expire_due, live_jobs

SEEDS = (11, 22)


def wait(registry: JobRegistry, token: bytes, *, timeout: float):
    """The server's wait for a result, on an event loop of its own."""
    return asyncio.run(registry.wait_result_async(token, timeout=timeout))


def records(items):
    """The items' records as a client uploads them: ascending and distinct."""
    return sorted_unique_records(*hash_keys(pl.Series(sorted(items), dtype=pl.String), SEEDS))


def decode(result, *universe_sets):
    """Map result records back to the items they came from."""
    universe = set().union(*universe_sets) if universe_sets else set()
    lookup = {}
    for item in universe:
        hi, lo = records([item])
        lookup[(int(hi[0]), int(lo[0]))] = item
    hi, lo = result_arrays(result.records)
    return sorted(lookup[(int(h), int(l))] for h, l in zip(hi, lo))


def result_arrays(result):
    """A sorted result's records as two arrays, from its chunks as they go out."""
    payload = b"".join(chunk for chunk, _ in result.chunks())
    pairs = np.frombuffer(payload, dtype=np.uint64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


@pytest.fixture
def registry():
    reg = JobRegistry(Limits(job_timeout_seconds=30))
    yield reg
    reg.close()


def _upload(reg: JobRegistry, token: bytes, items) -> None:
    _, _, store, _ = reg.begin_upload(token)
    store.add(*records(items))
    reg.finish_upload(token)


def test_intersection_is_sorted_and_shared(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    set_a = ["car", "cat", "dog", "train", "car"]
    set_b = {"train", "car", "cat", "e-car"}
    _upload(registry, a.token, set_a)
    _upload(registry, b.token, set_b)
    delivery_a = wait(registry, a.token, timeout=5)
    delivery_b = wait(registry, b.token, timeout=5)
    result_a, distinct_a = delivery_a.result, delivery_a.distinct_records
    result_b, distinct_b = delivery_b.result, delivery_b.distinct_records
    assert result_a is result_b
    assert decode(result_a, set_a) == ["car", "cat", "train"]
    assert (distinct_a, distinct_b) == (4, 4)
    assert result_a.sha256 == unsalted_records_sha256(*result_arrays(result_a.records))


def test_all_state_is_wiped_after_every_party_has_its_result(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    _upload(registry, a.token, {"x"})
    _upload(registry, b.token, {"x"})
    wait(registry, a.token, timeout=5)
    registry.mark_delivered(a.token)
    # The result can be fetched again until every party has it.
    assert decode(wait(registry, a.token, timeout=5).result, {"x"}) == ["x"]
    wait(registry, b.token, timeout=5)
    registry.mark_delivered(b.token)
    assert live_jobs(registry) == 0
    with pytest.raises(ServiceError) as err:
        wait(registry, a.token, timeout=1)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED
    # A new run with the same job id is a fresh job: it sees only its own data.
    c = registry.join("j1", "c", 1)
    _upload(registry, c.token, {"only-c"})
    assert decode(wait(registry, c.token, timeout=5).result, {"only-c", "x"}) == ["only-c"]


def test_jobs_are_isolated(registry):
    a = registry.join("j1", "a", 1)
    b = registry.join("j2", "a", 1)
    _upload(registry, a.token, {"one"})
    _upload(registry, b.token, {"two"})
    assert decode(wait(registry, a.token, timeout=5).result, {"one", "two"}) == ["one"]
    assert decode(wait(registry, b.token, timeout=5).result, {"one", "two"}) == ["two"]


def test_duplicate_party_name_and_second_upload_refused(registry):
    a = registry.join("j1", "a", 2)
    with pytest.raises(ServiceError) as err:
        registry.join("j1", "a", 2)
    # Without a spec nobody is authenticated: the one refusal line (see below).
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION
    assert "the name may be taken" in err.value.message
    _upload(registry, a.token, {"x"})
    with pytest.raises(ServiceError) as err:
        registry.begin_upload(a.token)
    assert err.value.kind is ErrorKind.ALREADY_EXISTS


def test_party_count_mismatch_and_full_job_refused(registry):
    registry.join("j1", "a", 2)
    with pytest.raises(ServiceError) as err:
        registry.join("j1", "b", 3)
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION
    registry.join("j1", "b", 2)
    with pytest.raises(ServiceError) as err:
        registry.join("j1", "c", 2)
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION


def test_unknown_session_refused(registry):
    with pytest.raises(ServiceError) as err:
        registry.begin_upload(b"\0" * 32)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED


@pytest.mark.parametrize("bad", ["", "-x", "a b", "x" * 200, "ä"])
def test_bad_identifiers_refused(registry, bad):
    with pytest.raises(ServiceError) as err:
        registry.join(bad, "a", 2)
    assert err.value.kind is ErrorKind.INVALID_ARGUMENT


def test_waiter_is_woken_by_last_upload(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    _upload(registry, a.token, {"x", "y"})
    got: list[list[str]] = []
    waiter = threading.Thread(
        target=lambda: got.append(decode(wait(registry, a.token, timeout=10).result, {"x", "y"}))
    )
    waiter.start()
    job = registry._jobs[("j1", b"")]
    give_up = time.monotonic() + 5
    while not job.waiters:  # the waiter is waiting before the last upload
        assert time.monotonic() < give_up and waiter.is_alive()
        time.sleep(0.01)
    _upload(registry, b.token, {"y"})
    waiter.join(5)
    assert got == [["y"]]


def test_aborted_upload_frees_the_slot(registry):
    a = registry.join("j1", "a", 2)
    registry.begin_upload(a.token)
    registry.abort_upload(a.token)
    assert live_jobs(registry) == 0  # its only party left: the job (and its slot) went too
    with pytest.raises(ServiceError) as err:
        registry.begin_upload(a.token)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED  # the broken session ended
    again = registry.join("j1", "a", 2)
    _upload(registry, again.token, {"z"})
    # With a partner still in the job, a broken upload frees the name's slot in it: the
    # same name joins again (a duplicate name is refused otherwise) and the job completes.
    b = registry.join("j1", "b", 2)
    registry.begin_upload(b.token)
    registry.abort_upload(b.token)
    assert live_jobs(registry) == 1
    b_again = registry.join("j1", "b", 2)
    _upload(registry, b_again.token, {"z", "w"})
    assert decode(wait(registry, again.token, timeout=5).result, {"z", "w"}) == ["z"]
    assert decode(wait(registry, b_again.token, timeout=5).result, {"z", "w"}) == ["z"]


def test_max_jobs_enforced():
    reg = JobRegistry(Limits(max_jobs=1))
    try:
        reg.join("j1", "a", 2)
        with pytest.raises(ServiceError) as err:
            reg.join("j2", "a", 2)
        assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    finally:
        reg.close()


TRIM = "xxh3-64x2-v1;normalize=trim;columns=1"
CASEFOLD = "xxh3-64x2-v1;normalize=trim,casefold;columns=1"


def _refusal(reg: JobRegistry, *args, **kwargs) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        reg.join(*args, **kwargs)
    return err.value


def test_quick_mode_refusals_are_one_line_that_reveals_nothing(registry):
    """Without a spec a joiner is not authenticated: whatever is wrong (settings, party
    count, name, state, full), it gets the same line, with no value of the job's."""
    registry.join("j1", "a", 2, TRIM)
    registry.join("j1", "b", 2, TRIM)  # full now
    registry.join("j2", "a", 3, TRIM)
    done = registry.join("j3", "a", 1, TRIM)
    _upload(registry, done.token, {"x"})  # j3 is done, its result not yet fetched
    refusals = [
        _refusal(registry, "j1", "c", 2, TRIM),  # full
        _refusal(registry, "j2", "a", 3, TRIM),  # name taken
        _refusal(registry, "j2", "b", 2, TRIM),  # party count differs
        _refusal(registry, "j2", "b", 3, CASEFOLD),  # key settings differ
        _refusal(registry, "j3", "b", 1, TRIM),  # done
    ]
    lines = {
        e.message.replace(f"job {j} as '{n}'", "")
        for e, j, n in zip(
            refusals, ["j1", "j2", "j2", "j2", "j3"], ["c", "a", "b", "b", "b"], strict=True
        )
    }
    assert len(lines) == 1, lines
    assert {e.kind for e in refusals} == {ErrorKind.FAILED_PRECONDITION}
    (line,) = lines
    assert "--parties" in line and "--normalize" in line
    for secret in ("trim", "casefold", " 2 ", " 3 ", "spec"):
        assert secret not in line


def _spec(job_id: str, *names: str, **fields):
    return _spec_with(job_id, {name: generate_private_key() for name in names}, **fields)


def _spec_with(job_id: str, keys: dict, recipients=None, **fields):
    parties = tuple(PartySpec(name=n, public_key=public_key_der(k)) for n, k in keys.items())
    return JobSpec(job_id=job_id, parties=parties, recipients=recipients or tuple(keys), **fields)


def test_key_scheme_mismatch_is_told_to_a_listed_party(registry):
    spec = _spec("contract", "alice", "bob")
    registry.join("contract", "alice", 2, TRIM, spec=spec)
    err = _refusal(registry, "contract", "bob", 2, CASEFOLD, spec=spec)
    assert err.kind is ErrorKind.FAILED_PRECONDITION
    assert "--normalize" in err.message
    assert "trim;" not in err.message.split("differ")[1]  # the job's settings stay private
    err = _refusal(registry, "contract", "alice", 2, TRIM, spec=spec)
    assert err.kind is ErrorKind.ALREADY_EXISTS


def test_a_spec_less_join_can_neither_squat_nor_see_a_spec_job(registry):
    """A quick-mode party that claims a contract's job id first does not lock the listed
    parties out, and a join without (or with another) spec learns nothing of the spec job."""
    spec = _spec("contract", "alice", "bob")
    squatter = registry.join("contract", "alice", 2, TRIM)  # first, and without the spec
    registry.join("contract", "bob", 2, TRIM)  # its accomplice: the quick job is full
    alice = registry.join("contract", "alice", 2, TRIM, spec=spec)
    bob = registry.join("contract", "bob", 2, TRIM, spec=spec)
    _upload(registry, alice.token, {"x", "y"})
    _upload(registry, bob.token, {"y"})
    assert decode(wait(registry, alice.token, timeout=5).result, {"x", "y"}) == ["y"]
    # The squatter's job is its own, untouched by the spec job's run.
    assert registry.begin_upload(squatter.token)[0] == "contract"
    # A third spec-less join is refused with the quick-mode line, which names no spec.
    err = _refusal(registry, "contract", "carol", 2, TRIM)
    assert "spec" not in err.message
    # Another spec for the same id is another job: no "different spec" answer either.
    other = _spec("contract", "alice", "bob")
    assert registry.join("contract", "alice", 2, TRIM, spec=other).token


def _creator(key: str, address: str = "ipv4:10.0.0.1") -> JobCreator:
    return JobCreator(key_sha256=key.encode().ljust(32, b"."), address=address)


def test_one_party_key_holds_at_most_its_share_of_the_jobs():
    reg = JobRegistry(Limits(max_jobs=8, max_jobs_per_party=2, max_jobs_per_address=0))
    try:
        mallory = _creator("mallory")
        reg.join("m1", "a", 2, creator=mallory)
        reg.join("m2", "a", 2, creator=mallory)
        err = _refusal(reg, "m3", "a", 2, creator=mallory)
        assert err.kind is ErrorKind.RESOURCE_EXHAUSTED and "--max-jobs-per-party" in err.message
        # Joining an existing job is not creating one: it is charged to nobody.
        reg.join("m1", "b", 2, creator=mallory)
        # Others still get slots.
        assert reg.join("h1", "a", 2, creator=_creator("honest")).token
        assert live_jobs(reg) == 3
    finally:
        reg.close()


def test_one_address_holds_at_most_its_share_of_the_jobs():
    reg = JobRegistry(Limits(max_jobs=8, max_jobs_per_party=8, max_jobs_per_address=3))
    try:
        for n in range(3):  # fresh keys from one address: a Sybil
            reg.join(f"s{n}", "a", 2, creator=_creator(f"sybil{n}", "ipv4:10.6.6.6"))
        err = _refusal(reg, "s3", "a", 2, creator=_creator("sybil3", "ipv4:10.6.6.6"))
        assert err.kind is ErrorKind.RESOURCE_EXHAUSTED
        assert "--max-jobs-per-address" in err.message
        assert reg.join("h1", "a", 2, creator=_creator("honest", "ipv4:10.0.0.2")).token
    finally:
        reg.close()


def test_job_without_upload_is_dropped_after_the_join_timeout():
    """A join alone holds a --max-jobs slot only for --join-timeout."""
    now = [1_000.0]
    reg = JobRegistry(
        Limits(max_jobs=2, job_timeout_seconds=30, join_timeout_seconds=0.5),
        clock=lambda: now[0],
    )
    try:
        idle = reg.join("idle", "a", 2)
        busy = reg.join("busy", "a", 2)
        reg.begin_upload(busy.token)  # an upload has begun: the job keeps its deadline
        assert _refusal(reg, "third", "a", 1).kind is ErrorKind.RESOURCE_EXHAUSTED
        now[0] += 0.4
        expire_due(reg)
        assert live_jobs(reg) == 2  # not yet: the join timeout has not passed
        now[0] += 0.2
        expire_due(reg)
        # The one job left is busy: its session still holds (watch_call refuses an ended one).
        assert live_jobs(reg) == 1
        reg.watch_call(busy.token, lambda _error: None)()
        with pytest.raises(ServiceError) as err:
            reg.begin_upload(idle.token)
        assert err.value.kind is ErrorKind.UNAUTHENTICATED
        assert reg.join("third", "a", 1).token  # the slot is free again
    finally:
        reg.close()


def _rand(n, seed):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 2**64 - 1, n, dtype=np.uint64),
        rng.integers(0, 2**64 - 1, n, dtype=np.uint64),
    )


def test_intersect_records_semantics():
    hi, lo = _rand(1000, 1)
    a = (hi[:600], lo[:600])
    b = (np.concatenate([hi[300:], hi[300:310]]), np.concatenate([lo[300:], lo[300:310]]))
    c = (hi[::2], lo[::2])
    rhi, rlo, distinct = intersect_records([a, b, c])
    assert distinct == [600, 700, 500]
    expected = sorted(
        (int(h), int(l)) for h, l in zip(hi[300:600], lo[300:600]) if (h, l) in set(zip(c[0], c[1]))
    )
    assert [(int(h), int(l)) for h, l in zip(rhi, rlo)] == expected
    # Same hi, different lo: not a match (exact on all 128 bits).
    x = (np.array([5], np.uint64), np.array([1], np.uint64))
    y = (np.array([5], np.uint64), np.array([2], np.uint64))
    assert len(intersect_records([x, y])[0]) == 0
    assert len(intersect_records([x, (x[0][:0], x[1][:0])])[0]) == 0


def test_u128_round_trip():
    hi, lo = _rand(100, 2)
    back_hi, back_lo = split_u128(as_u128(hi, lo))
    assert np.array_equal(back_hi, hi) and np.array_equal(back_lo, lo)


_small_records = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 3)), max_size=12
)  # tiny ranges: repeats and shared first digests are common


@given(st.lists(_small_records, min_size=1, max_size=4))
@settings(max_examples=300, deadline=None)
def test_intersect_records_matches_a_set_model(parties):
    """Any order, repeats, records sharing their first digest: exact 128-bit semantics."""
    arrays = [
        (np.array([h for h, _ in p], np.uint64), np.array([lo for _, lo in p], np.uint64))
        for p in parties
    ]
    rhi, rlo, distinct = intersect_records(arrays)
    sets = [set(p) for p in parties]
    assert distinct == [len(s) for s in sets]
    assert list(zip(rhi.tolist(), rlo.tolist(), strict=True)) == sorted(set.intersection(*sets))


def test_sorted_upload_is_only_checked_and_unsorted_is_sorted():
    hi, lo = _rand(1000, 3)
    shi, slo = split_u128(as_u128(hi, lo).sort())
    assert is_strictly_increasing(shi, slo) and not is_strictly_increasing(hi, lo)
    same = sorted_unique_records(shi, slo)
    assert same[0] is shi and same[1] is slo  # no copy for an honest, sorted upload
    again = sorted_unique_records(hi, lo)
    assert np.array_equal(again[0], shi) and np.array_equal(again[1], slo)
    repeated = (np.repeat(shi, 2), np.repeat(slo, 2))
    assert not is_strictly_increasing(*repeated)
    assert np.array_equal(sorted_unique_records(*repeated)[1], slo)


@pytest.mark.parametrize("budget", [1 << 30, 4096])
def test_intersect_stores_equals_intersect_records(tmp_path, budget):
    """Spilled or not, in chunks that split partitions, the result (in ascending order),
    distinct counts and set digests are those of the one-shot intersection."""
    import hashlib

    from teepsi.engine.result import intersect_stores
    from teepsi.engine.spill import SpillArea
    from teepsi.engine.store import MemoryBudget, Partitioner, RecordStore

    hi, lo = _rand(30_000, 9)
    parties = [(hi[:20_000], lo[:20_000]), (hi[5_000:], lo[5_000:]), (hi[::3], lo[::3])]
    parties = [split_u128(as_u128(h, lo_).sort()) for h, lo_ in parties]
    limits = MemoryBudget(budget)
    spill = SpillArea(tmp_path)
    partitioner = Partitioner()
    salts = [b"s1", b"s2", b"s3"]
    stores = []
    for (party_hi, party_lo), salt in zip(parties, salts, strict=True):
        store = RecordStore(limits, spill, partitioner, salt=salt)
        for start in range(0, len(party_hi), 777):  # chunks that split partitions
            store.add(party_hi[start : start + 777].copy(), party_lo[start : start + 777].copy())
        store.finish()
        assert store.spilled is (budget < 1 << 20)
        stores.append(store)
    assert any(spill.path.iterdir()) is (budget < 1 << 20)
    found = intersect_stores(stores, spill=spill, chunk_records=1000, salts=[b"", b"salt"])
    digests = [hashlib.sha256(salt) for salt in salts]
    ehi, elo, distinct = intersect_records(parties, digests)
    assert np.array_equal(result_arrays(found.result), (ehi, elo))
    assert found.result.sha256_per_salt == records_sha256_per_salt(ehi, elo, [b"", b"salt"])
    assert all(len(chunk) == 1000 * 16 for chunk, _ in list(found.result.chunks())[:-1])
    assert (found.result.sealed_chunks > 0) is (budget < 1 << 20)
    assert found.distinct == distinct == [20_000, 25_000, 10_000]
    assert found.set_sha256 == [d.digest() for d in digests]
    for store in stores:
        store.close()
    assert limits.held == found.result.records * 16 - found.result.sealed_chunks * 1000 * 16
    found.result.close()
    assert limits.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_store_takes_records_only_ascending_and_distinct(tmp_path):
    """The store's set digest and sorted partitions rest on the upload's order: a record
    out of order or repeated, within a chunk or across chunks, is refused (and the store
    is left as it was)."""
    from teepsi.engine.store import MemoryBudget, Partitioner, RecordOrderError, RecordStore

    hi, lo = split_u128(as_u128(*_rand(1_000, 3)).sort())
    store = RecordStore(MemoryBudget(1 << 20), None, Partitioner())
    store.add(hi[:500], lo[:500])
    refused = [
        (hi[500:][::-1], lo[500:][::-1]),  # descending
        (np.repeat(hi[500:510], 2), np.repeat(lo[500:510], 2)),  # repeats within a chunk
        (hi[499:600], lo[499:600]),  # repeats the previous chunk's last record
        (hi[:10], lo[:10]),  # below what came before
    ]
    for bad_hi, bad_lo in refused:
        with pytest.raises(RecordOrderError):
            store.add(bad_hi, bad_lo)
    assert store.records == 500
    store.add(hi[500:], lo[500:])
    assert store.records == 1_000


# -- asyncio waits (the gRPC server's): no thread held while waiting ------------------------


def test_async_waiters_of_many_jobs_are_woken_by_their_own_release(registry):
    """Nine asyncio waiters (3 jobs x 3 parties) on one loop thread, no other thread: each is
    woken by its own job's last upload (from another thread), none by another job's."""
    tokens = {}
    for j in range(3):
        for p in range(4):
            tokens[(j, p)] = registry.join(f"j{j}", f"p{p}", 4).token
    for j in range(3):
        for p in range(3):
            _upload(registry, tokens[(j, p)], {f"j{j}", f"own-{j}-{p}"})

    async def wait_all():
        waits = {
            key: asyncio.ensure_future(registry.wait_result_async(token, timeout=20))
            for key, token in tokens.items()
            if key[1] < 3
        }
        await asyncio.sleep(0.1)
        assert not any(w.done() for w in waits.values())
        threads = threading.active_count()
        released: set[int] = set()
        for j in (2, 0, 1):
            # The last party of job j uploads from another thread; only job j's wake.
            uploader = threading.Thread(
                target=_upload, args=(registry, tokens[(j, 3)], {f"j{j}", "last"})
            )
            uploader.start()
            mine = [w for key, w in waits.items() if key[0] == j]
            done, _ = await asyncio.wait(mine, timeout=10)
            assert len(done) == 3
            released.add(j)
            await asyncio.sleep(0.05)
            assert all(not w.done() for key, w in waits.items() if key[0] not in released)
            uploader.join(5)
        assert threading.active_count() <= threads
        return {key: w.result() for key, w in waits.items()}

    deliveries = asyncio.run(wait_all())
    for (j, _), delivery in deliveries.items():
        assert decode(delivery.result, {f"j{j}", "last"}) == [f"j{j}"]


def test_missing_party_gives_deadline_error_without_spinning():
    reg = JobRegistry(Limits(job_timeout_seconds=1.0))
    try:
        a = reg.join("late", "a", 2)
        _upload(reg, a.token, {"x"})
        cpu_before = time.process_time()
        wall_before = time.monotonic()
        with pytest.raises(ServiceError) as err:
            asyncio.run(reg.wait_result_async(a.token, timeout=10))
        waited = time.monotonic() - wall_before
        assert err.value.kind is ErrorKind.DEADLINE_EXCEEDED
        assert err.value.message == (
            "job late expired: 1 of 2 parties uploaded before its deadline; 1 party has not joined"
        )
        assert 0.5 < waited < 5
        assert time.process_time() - cpu_before < 0.2 * waited
        assert live_jobs(reg) == 0
    finally:
        reg.close()


def test_async_wait_tells_why_on_shutdown_and_cancel_leaves_no_waker():
    reg = JobRegistry(Limits(job_timeout_seconds=30))
    a = reg.join("j", "a", 2)
    _upload(reg, a.token, {"x"})
    job = reg._jobs[("j", b"")]

    async def cancelled_then_shutdown():
        wait = asyncio.ensure_future(reg.wait_result_async(a.token, timeout=None))
        await asyncio.sleep(0.05)
        assert len(job.waiters) == 1
        wait.cancel()
        with pytest.raises(asyncio.CancelledError):
            await wait
        assert job.waiters == set()  # a caller that went away leaves nothing behind
        wait = asyncio.ensure_future(reg.wait_result_async(a.token, timeout=None))
        await asyncio.sleep(0.05)
        closer = threading.Thread(target=reg.close)
        closer.start()
        with pytest.raises(ServiceError) as err:
            await asyncio.wait_for(wait, 10)
        closer.join(10)
        return err.value

    error = asyncio.run(cancelled_then_shutdown())
    assert error.kind is ErrorKind.UNAVAILABLE
    assert error.message == ("server shutting down: job j was dropped; run every party again")


def _key_creator(key) -> JobCreator:
    return JobCreator(key_sha256=hashlib.sha256(public_key_der(key)).digest(), address="")


def test_a_listed_party_is_told_its_co_parties_use_another_spec(registry):
    """Stale copy: a party of alice's own spec created the job under another version."""
    alice, bob = generate_private_key(), generate_private_key()
    old = _spec_with("c", {"alice": alice, "bob": bob})
    new = _spec_with("c", {"alice": alice, "bob": bob}, min_intersection=1)
    registry.join("c", "bob", 2, TRIM, spec=old, creator=_key_creator(bob))
    err = _refusal(registry, "c", "alice", 2, TRIM, spec=new, creator=_key_creator(alice))
    assert err.kind is ErrorKind.FAILED_PRECONDITION and "digest mismatch" in err.message
    assert "min_intersection" not in err.message  # nothing of the other spec


def test_a_fake_spec_naming_a_party_does_not_block_it(registry):
    """Mallory writes a spec listing alice's (public) key first; alice's real job runs."""
    alice, bob, mallory = (generate_private_key() for _ in range(3))
    fake = _spec_with("c", {"alice": alice, "mallory": mallory}, recipients=("mallory",))
    registry.join("c", "mallory", 2, TRIM, spec=fake, creator=_key_creator(mallory))
    real = _spec_with("c", {"alice": alice, "bob": bob})
    a = registry.join("c", "alice", 2, TRIM, spec=real, creator=_key_creator(alice))
    b = registry.join("c", "bob", 2, TRIM, spec=real, creator=_key_creator(bob))
    _upload(registry, a.token, {"x"})
    _upload(registry, b.token, {"x"})
    assert decode(wait(registry, a.token, timeout=5).result, {"x"}) == ["x"]


def _two_party_spec(job: str = "js"):
    from teepsi.contract.party_keys import generate_private_key, public_key_der, public_key_text
    from teepsi.contract.spec import JobSpec

    parties = [
        {"name": name, "public_key": public_key_text(public_key_der(generate_private_key()))}
        for name in ("a", "b")
    ]
    data = {"job_id": job, "parties": parties}
    import json

    return JobSpec.parse(json.dumps(data).encode(), source="spec.json", fmt="json")


def test_resume_gives_an_uploaded_party_a_new_session_for_its_slot(registry):
    spec = _two_party_spec()
    a = registry.join("js", "a", 2, spec=spec)
    b = registry.join("js", "b", 2, spec=spec)
    # Nothing to resume before the upload is complete.
    with pytest.raises(ServiceError) as err:
        registry.resume("js", "a", spec=spec)
    assert err.value.kind is ErrorKind.FAILED_PRECONDITION
    _upload(registry, a.token, {"x", "y"})
    again = registry.resume("js", "a", spec=spec)
    assert again.token != a.token and again.key_seeds == a.key_seeds
    # The dead client's session is gone; the new one is the party's.
    with pytest.raises(ServiceError) as err:
        wait(registry, a.token, timeout=1)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED
    _upload(registry, b.token, {"y", "z"})
    got = wait(registry, again.token, timeout=5)
    assert len(got.result) == 1
    # Only under the job's own spec, and only for a party of the job.
    with pytest.raises(ServiceError) as err:
        registry.resume("js", "a", spec=_two_party_spec())
    assert err.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(ServiceError) as err:
        registry.resume("js", "c", spec=spec)
    assert err.value.kind is ErrorKind.NOT_FOUND


def test_waiting_partner_learns_who_broke_off():
    """The job's parties learn why it fails: who uploaded, whose upload broke off."""
    reg = JobRegistry(Limits(job_timeout_seconds=1.0))
    try:
        a = reg.join("gone", "a", 3)
        b = reg.join("gone", "b", 3)
        c = reg.join("gone", "c", 3)
        _upload(reg, a.token, {"x"})
        _upload(reg, b.token, {"x"})
        reg.begin_upload(c.token)
        reg.abort_upload(c.token)  # c's client died mid-upload
        with pytest.raises(ServiceError) as err:
            wait(reg, a.token, timeout=10)
        assert err.value.kind is ErrorKind.DEADLINE_EXCEEDED
        assert err.value.message == (
            "job gone expired: 2 of 3 parties uploaded before its deadline; "
            "party c joined but its upload broke off"
        )
    finally:
        reg.close()


# -- a job that ends ends what it holds ---------------------------------------------------


def _sorted_rand(n, seed):
    return split_u128(as_u128(*_rand(n, seed)).sort())


def test_closed_store_refuses_data_and_reserves_nothing(tmp_path):
    from teepsi.engine.spill import SpillArea
    from teepsi.engine.store import MemoryBudget, Partitioner, RecordStore, StoreClosed

    budget = MemoryBudget(1 << 20)
    spill = SpillArea(tmp_path)
    hi, lo = _sorted_rand(1_000, 5)
    store = RecordStore(budget, spill, Partitioner())
    store.add(hi[:500], lo[:500])
    assert budget.held == 500 * 16
    store.close()
    assert budget.held == 0
    for use in (
        lambda: store.add(hi[500:], lo[500:]),
        store.finish,
        lambda: store.partition(0),
    ):
        with pytest.raises(StoreClosed):
            use()
    assert budget.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_close_during_a_running_add_returns_at_once_and_the_add_gives_everything_back(
    tmp_path,
):
    """The registry closes stores under its lock, from another thread than the upload's:
    close() must not wait for a slow disk, and the add that was running must not leave
    memory reserved or a segment on disk behind it."""
    from teepsi.engine.spill import SpillArea
    from teepsi.engine.store import MemoryBudget, Partitioner, RecordStore, StoreClosed

    writing, disk_free = threading.Event(), threading.Event()

    class SlowDisk(SpillArea):
        def write(self, payload: bytes, label: bytes):
            writing.set()
            disk_free.wait(10)
            return super().write(payload, label)

    budget = MemoryBudget(8_000)
    spill = SlowDisk(tmp_path)
    hi, lo = _sorted_rand(1_000, 6)
    store = RecordStore(budget, spill, Partitioner())
    store.add(hi[:500], lo[:500])  # reserved: 8,000 bytes
    outcome = []
    adder = threading.Thread(target=lambda: outcome.append(store.add(hi[500:], lo[500:])))
    adder.start()  # over the budget: spills, and the disk is slow
    assert writing.wait(10)
    started = time.monotonic()
    store.close()
    assert time.monotonic() - started < 1
    disk_free.set()
    adder.join(10)
    assert outcome == [None]
    assert budget.held == 0 and not any(spill.path.iterdir())
    with pytest.raises(StoreClosed):
        store.add(hi[500:], lo[500:])
    spill.close()


def test_expiry_ends_watched_calls_and_gives_back_budget_and_spill_at_once(tmp_path):
    """At expiry (an injected clock, no sleeping) the job's watched calls are told why
    before its stores close; memory reserved and segments spilled by its uploads are
    given back at once, and an upload still holding its store is refused."""
    from teepsi.engine.store import StoreClosed

    now = [1_000.0]
    reg = JobRegistry(
        Limits(job_timeout_seconds=10, memory_budget_bytes=8_000, memory_runtime_bytes=0),
        clock=lambda: now[0],
        spill_dir=str(tmp_path),
    )
    try:
        a, b = reg.join("j", "a", 2), reg.join("j", "b", 2)
        told = []
        reg.watch_call(a.token, told.append)
        stopped = []
        unwatch = reg.watch_call(b.token, stopped.append)
        unwatch()  # a call that ended on its own is not told
        hi, lo = _sorted_rand(1_000, 7)
        _, _, store_a, _ = reg.begin_upload(a.token)
        store_a.add(hi[:400], lo[:400])  # 6,400 bytes reserved
        _, _, store_b, _ = reg.begin_upload(b.token)
        store_b.add(hi[400:500], lo[400:500])  # 1,600 more: the budget is full
        store_b.add(hi[500:600], lo[500:600])  # over it: b spills
        assert reg.budget.held == 6_400 and any(reg.spill.path.iterdir())
        now[0] += 11
        expire_due(reg)
        assert [(e.kind, e.message) for e in told] == [
            (
                ErrorKind.DEADLINE_EXCEEDED,
                "job j expired: 0 of 2 parties uploaded before its deadline; party a joined "
                "but has not finished uploading; party b joined but has not finished uploading",
            )
        ]
        assert stopped == []
        assert reg.budget.held == 0 and not any(reg.spill.path.iterdir())
        with pytest.raises(StoreClosed):
            store_a.add(hi[400:], lo[400:])
        assert reg.budget.held == 0 and not any(reg.spill.path.iterdir())
        with pytest.raises(ServiceError) as err:
            reg.watch_call(a.token, told.append)
        assert err.value.kind is ErrorKind.UNAUTHENTICATED
    finally:
        reg.close()


def test_expiry_during_the_intersection_stops_it_with_the_job_s_reason(tmp_path):
    """The intersection runs without the registry lock; a job that expires meanwhile takes
    its stores with it: the computation stops at the next partition with the job's
    reason (DEADLINE_EXCEEDED), holds nothing of the budget and leaves no spill file."""
    from teepsi.engine.spill import SpillArea

    reading, disk_free = threading.Event(), threading.Event()

    class SlowDisk(SpillArea):
        def read(self, path, label):
            reading.set()
            disk_free.wait(10)
            return super().read(path, label)

    now = [1_000.0]
    reg = JobRegistry(
        Limits(job_timeout_seconds=10, memory_budget_bytes=8_000, memory_runtime_bytes=0),
        clock=lambda: now[0],
        spill_dir=str(tmp_path),
    )
    reg.spill.close()
    reg.spill = SlowDisk(tmp_path)
    try:
        a, b = reg.join("j", "a", 2), reg.join("j", "b", 2)
        hi, lo = _sorted_rand(2_000, 8)
        for outcome, rows in ((a, slice(0, 1_200)), (b, slice(800, 2_000))):
            _, _, store, _ = reg.begin_upload(outcome.token)
            store.add(hi[rows][:400], lo[rows][:400])
            store.add(hi[rows][400:], lo[rows][400:])
        reg.finish_upload(a.token)
        failed = []

        def last_upload():
            try:
                reg.finish_upload(b.token)
            except ServiceError as exc:
                failed.append(exc)

        computing = threading.Thread(target=last_upload)
        computing.start()
        assert reading.wait(10)
        now[0] += 11
        expire_due(reg)
        disk_free.set()
        computing.join(10)
        assert [(e.kind, e.message) for e in failed] == [
            (
                ErrorKind.DEADLINE_EXCEEDED,
                "job j expired: 2 of 2 parties uploaded before its deadline",
            )
        ]
        assert reg.budget.held == 0 and not any(reg.spill.path.iterdir())
        assert live_jobs(reg) == 0
    finally:
        disk_free.set()
        reg.close()


# -- the memory bound holds against crafted records ---------------------------------------


def _crafted(n, kind, seed):
    """Records a hostile party can choose freely: all in one partition of the old split
    (the top 6 bits of the first digest), or all with one first digest."""
    rng = np.random.default_rng(seed)
    lo = rng.integers(0, 2**64, n, dtype=np.uint64)
    if kind == "one old partition":
        hi = rng.integers(0, 2**58, n, dtype=np.uint64)  # top 6 bits all 0
    else:
        hi = np.full(n, 0x0123_4567_89AB_CDEF, dtype=np.uint64)
    return split_u128(as_u128(hi, lo).sort())


@pytest.mark.parametrize("kind", ["one old partition", "equal first digest"])
def test_crafted_records_spread_and_the_intersection_stays_within_the_budget(tmp_path, kind):
    """Two parties upload 200,000 crafted records each (3.2 MB, both spilled) at a
    512 KiB budget, 1,000 in common. The keyed split spreads them evenly; the
    intersection's working set (counted in the budget, and what tracemalloc sees
    allocated while it runs) stays within the budget; the result is exact and ascending;
    no spill file is left after the stores close."""
    import tracemalloc

    from teepsi.engine.result import INTERSECT_THREADS, intersect_stores
    from teepsi.engine.spill import SpillArea
    from teepsi.engine.store import PARTITIONS, MemoryBudget, Partitioner, RecordStore

    n, common, limit = 200_000, 1_000, 512 * 1024
    hi, lo = _crafted(2 * n - common, kind, 8)
    rng = np.random.default_rng(9)
    order = rng.permutation(len(hi))
    a_rows, b_rows = np.sort(order[:n]), np.sort(order[n - common :])
    parties = [(hi[a_rows], lo[a_rows]), (hi[b_rows], lo[b_rows])]
    budget = MemoryBudget(limit)
    spill = SpillArea(tmp_path)
    partitioner = Partitioner()
    stores = []
    for party_hi, party_lo in parties:
        store = RecordStore(budget, spill, partitioner)
        for start in range(0, n, 16_384):
            store.add(party_hi[start : start + 16_384], party_lo[start : start + 16_384])
        store.finish()
        assert store.spilled
        loads = [store.partition_bytes(p) for p in range(PARTITIONS)]
        assert max(loads) < 1.25 * n * 16 / PARTITIONS  # even: no partition takes the lot
        stores.append(store)
    assert budget.held == 0
    budget.reset_peak()
    tracemalloc.start()
    try:
        found = intersect_stores(stores, spill=spill, chunk_records=4096)
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Balanced, one partition of both parties is about 100 KB (the old split: 6.4 MB);
    # the intersection works on INTERSECT_THREADS partitions at once.
    assert 0 < budget.peak < INTERSECT_THREADS * limit / 4
    assert traced_peak < limit
    ehi, elo, _ = intersect_records(parties)
    assert len(ehi) == common
    assert np.array_equal(result_arrays(found.result), (ehi, elo))
    assert found.distinct == [n, n]
    found.result.close()
    for store in stores:
        store.close()
    assert budget.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_spilling_uploads_hold_their_buffers_within_the_budget(tmp_path):
    """Uploads that spill keep buffering between writes; those buffers are reserved like
    any other, so two uploads of 3.2 MB each at a 512 KiB budget never hold more than the
    budget (plus the one chunk being stored), and the budget sees all of it."""
    import tracemalloc

    from teepsi.engine.spill import SpillArea
    from teepsi.engine.store import MemoryBudget, Partitioner, RecordStore

    n, chunk, limit = 200_000, 16_384, 512 * 1024
    # Each chunk arrives as its wire bytes, as the server receives it.
    payloads = [
        [records_to_bytes(hi[at : at + chunk], lo[at : at + chunk]) for at in range(0, n, chunk)]
        for hi, lo in (_sorted_rand(n, 10), _sorted_rand(n, 11))
    ]
    budget = MemoryBudget(limit)
    spill = SpillArea(tmp_path)
    partitioner = Partitioner()
    stores = [RecordStore(budget, spill, partitioner) for _ in payloads]
    tracemalloc.start()
    try:
        for chunks in zip(*payloads, strict=True):
            for store, records in zip(stores, chunks, strict=True):
                store.add_records(records)
                assert budget.held <= limit
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(store.spilled for store in stores)
    assert budget.peak <= limit
    # The chunk being stored is grouped by partition in a copy: about 2 chunks at most.
    assert traced_peak < limit + 4 * chunk * 16
    for store in stores:
        store.close()
    assert budget.held == 0 and not any(spill.path.iterdir())
    spill.close()


def test_partitions_do_not_follow_the_first_digest():
    """Records with one first digest, or ones differing in only one bit, land in all
    partitions; two partitioners (two jobs) split the same records differently."""
    from teepsi.engine.records import records_to_bytes
    from teepsi.engine.store import PARTITIONS, Partitioner

    n = 64_000
    lo = np.arange(n, dtype=np.uint64)
    hi = np.zeros(n, dtype=np.uint64)
    records = records_to_bytes(hi, lo)
    one, other = Partitioner().partitions(records), Partitioner().partitions(records)
    counts = np.bincount(one, minlength=PARTITIONS)
    assert len(counts) == PARTITIONS and counts.min() > 0.8 * n / PARTITIONS
    assert counts.max() < 1.2 * n / PARTITIONS
    assert np.mean(one == other) < 0.05
    assert np.array_equal(
        Partitioner(b"k" * 16).partitions(records), Partitioner(b"k" * 16).partitions(records)
    )


def _progress(reg: JobRegistry, token: bytes, seen=None, *, timeout: float = 5.0):
    return asyncio.run(reg.next_progress_async(token, seen, timeout=timeout))


def test_a_waiting_party_learns_the_counts_and_why_a_partner_was_refused(registry):
    """While it waits, a party of the job gets counts and the job's progress line: who has
    not joined, and that a would-be partner was refused for other key settings; the counts
    change with joins and uploads; the wait for a change is woken, not polled."""
    a = registry.join("prog", "a", 3, TRIM)
    _upload(registry, a.token, {"x"})
    first = _progress(registry, a.token)
    assert (first.party_count, first.joined, first.uploaded, first.waiting) == (3, 1, 1, True)
    assert first.status == "1 of 3 parties joined, 1 uploaded"
    other = TRIM.replace("normalize=trim", "normalize=trim,casefold")
    _refusal(registry, "prog", "b", 3, other)
    refused = _progress(registry, a.token, first)
    assert refused.status == (
        "1 of 3 parties joined, 1 uploaded; a party was refused: different "
        "key settings (--normalize or the number of --key columns)"
    )
    # Nothing changes: the wait ends at its timeout with nothing new.
    started = time.monotonic()
    assert _progress(registry, a.token, refused, timeout=0.3) is None
    assert 0.25 <= time.monotonic() - started < 2
    # A join from another thread wakes a waiting watcher at once.
    threading.Timer(0.2, lambda: registry.join("prog", "b", 3, TRIM)).start()
    joined = _progress(registry, a.token, refused, timeout=10)
    assert (joined.joined, joined.uploaded) == (2, 1)
    # Only parties of the job: an unknown session is refused.
    with pytest.raises(ServiceError) as err:
        _progress(registry, b"\0" * 32)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED


def test_the_progress_line_carries_counts_never_party_names(registry):
    """A watcher learns how many joined, uploaded and left, not who: it may be the first
    to join, and learns no more of its partners than the receipt would tell it."""
    a = registry.join("names", "alice", 3, TRIM)
    _upload(registry, a.token, {"x"})
    registry.join("names", "bob", 3, TRIM)
    carol = registry.join("names", "carol", 3, TRIM)
    registry.begin_upload(carol.token)
    registry.abort_upload(carol.token)  # carol's upload broke off: her slot is free again
    view = _progress(registry, a.token)
    assert (view.joined, view.uploaded) == (2, 1)
    assert view.status == "2 of 3 parties joined, 1 uploaded; a party left: its upload broke off"
    for name in ("alice", "bob", "carol"):
        assert name not in view.status


def test_a_party_watches_only_its_own_job(registry):
    """The session picks the job: a party of one job sees that job's counts, never
    another's, and an ended session sees nothing."""
    mine = registry.join("mine", "a", 2, TRIM)
    theirs = registry.join("theirs", "a", 4, TRIM)
    registry.join("theirs", "b", 4, TRIM)
    registry.join("theirs", "c", 4, TRIM)
    view = _progress(registry, mine.token)
    assert (view.party_count, view.joined) == (2, 1)
    assert view.status == "1 of 2 parties joined, 0 uploaded"
    assert _progress(registry, theirs.token).status == "3 of 4 parties joined, 0 uploaded"
    registry.begin_upload(mine.token)
    registry.abort_upload(mine.token)  # its last party left: the job and session are gone
    with pytest.raises(ServiceError) as err:
        _progress(registry, mine.token)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED


def test_a_call_after_shutdown_is_told_the_server_is_shutting_down(registry):
    """A party whose next call comes after the jobs were dropped at shutdown learns that,
    not that its session is unknown (it did join: only the server went away)."""
    a = registry.join("j1", "a", 2)
    registry.close()
    for call in (
        lambda: registry.begin_upload(a.token),
        lambda: wait(registry, a.token, timeout=1),
    ):
        with pytest.raises(ServiceError) as err:
            call()
        assert err.value.kind is ErrorKind.UNAVAILABLE
        assert "shutting down" in str(err.value)
    with pytest.raises(ServiceError) as err:
        registry.begin_upload(b"\0" * 32)  # a token it never issued: the same answer now
    assert err.value.kind is ErrorKind.UNAVAILABLE
