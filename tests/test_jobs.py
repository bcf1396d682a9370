"""The job lifecycle without gRPC: isolation, barriers, deadlines, cleanup."""

from __future__ import annotations

import threading
import time

import pytest

from teepsi.engine.intersect import intersect, result_digest
from teepsi.server.errors import ErrorKind, ServiceError
from teepsi.server.jobs import JobRegistry, Limits


@pytest.fixture
def registry():
    reg = JobRegistry(Limits(job_timeout_seconds=30))
    yield reg
    reg.close()


def _upload(reg: JobRegistry, token: bytes, items: set[bytes]) -> None:
    reg.begin_upload(token)
    reg.finish_upload(token, items, len(items))


def test_intersection_is_sorted_and_shared(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    _upload(registry, a.token, {b"car", b"cat", b"dog", b"train"})
    _upload(registry, b.token, {b"train", b"car", b"cat", b"e-car"})
    items_a, digest_a = registry.wait_result(a.token, timeout=5)
    items_b, digest_b = registry.wait_result(b.token, timeout=5)
    assert items_a == items_b == [b"car", b"cat", b"train"]
    assert digest_a == digest_b == result_digest([b"car", b"cat", b"train"])


def test_all_state_is_wiped_after_every_party_has_its_result(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    _upload(registry, a.token, {b"x"})
    _upload(registry, b.token, {b"x"})
    registry.wait_result(a.token, timeout=5)
    registry.mark_delivered(a.token)
    # The result can be fetched again until every party has it.
    assert registry.wait_result(a.token, timeout=5)[0] == [b"x"]
    registry.wait_result(b.token, timeout=5)
    registry.mark_delivered(b.token)
    assert registry.job_count() == 0
    with pytest.raises(ServiceError) as err:
        registry.wait_result(a.token, timeout=1)
    assert err.value.kind is ErrorKind.UNAUTHENTICATED
    # A new run with the same job id is a fresh job: it sees only its own data.
    c = registry.join("j1", "c", 1)
    _upload(registry, c.token, {b"only-c"})
    assert registry.wait_result(c.token, timeout=5)[0] == [b"only-c"]


def test_jobs_are_isolated(registry):
    a = registry.join("j1", "a", 1)
    b = registry.join("j2", "a", 1)
    _upload(registry, a.token, {b"one"})
    _upload(registry, b.token, {b"two"})
    assert registry.wait_result(a.token, timeout=5)[0] == [b"one"]
    assert registry.wait_result(b.token, timeout=5)[0] == [b"two"]


def test_duplicate_party_name_and_second_upload_refused(registry):
    a = registry.join("j1", "a", 2)
    with pytest.raises(ServiceError) as err:
        registry.join("j1", "a", 2)
    assert err.value.kind is ErrorKind.ALREADY_EXISTS
    _upload(registry, a.token, {b"x"})
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


def test_missing_party_gives_deadline_error_without_spinning():
    reg = JobRegistry(Limits(job_timeout_seconds=1.0))
    try:
        a = reg.join("j1", "a", 2)
        _upload(reg, a.token, {b"x"})
        cpu_before = time.process_time()
        wall_before = time.monotonic()
        with pytest.raises(ServiceError) as err:
            reg.wait_result(a.token, timeout=10)
        waited = time.monotonic() - wall_before
        assert err.value.kind is ErrorKind.DEADLINE_EXCEEDED
        assert "1 of 2 parties" in err.value.message
        assert 0.5 < waited < 5
        # A condition wait costs next to no CPU; a spin would burn about `waited`.
        assert time.process_time() - cpu_before < 0.2 * waited
        assert reg.job_count() == 0
    finally:
        reg.close()


def test_waiter_is_woken_by_last_upload(registry):
    a = registry.join("j1", "a", 2)
    b = registry.join("j1", "b", 2)
    _upload(registry, a.token, {b"x", b"y"})
    got: list[list[bytes]] = []
    waiter = threading.Thread(
        target=lambda: got.append(registry.wait_result(a.token, timeout=10)[0])
    )
    waiter.start()
    time.sleep(0.1)
    _upload(registry, b.token, {b"y"})
    waiter.join(5)
    assert got == [[b"y"]]


def test_aborted_upload_frees_the_slot(registry):
    a = registry.join("j1", "a", 2)
    registry.begin_upload(a.token)
    registry.abort_upload(a.token)
    again = registry.join("j1", "a", 2)
    _upload(registry, again.token, {b"z"})


def test_max_items_per_party_enforced():
    reg = JobRegistry(Limits(max_items_per_party=2))
    try:
        a = reg.join("j", "a", 1)
        reg.begin_upload(a.token)
        with pytest.raises(ServiceError) as err:
            reg.finish_upload(a.token, {b"1", b"2", b"3"}, 3)
        assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    finally:
        reg.close()


def test_max_jobs_enforced():
    reg = JobRegistry(Limits(max_jobs=1))
    try:
        reg.join("j1", "a", 2)
        with pytest.raises(ServiceError) as err:
            reg.join("j2", "a", 2)
        assert err.value.kind is ErrorKind.RESOURCE_EXHAUSTED
    finally:
        reg.close()


def test_intersect_semantics():
    assert intersect([]) == []
    assert intersect([{b"a"}, set()]) == []
    assert intersect([{b"b", b"a"}, {b"a", b"b"}, {b"b"}]) == [b"b"]
    # Bytewise order, not locale order.
    assert intersect([{b"Z", b"a", "é".encode()}] * 2) == [b"Z", b"a", "é".encode()]
