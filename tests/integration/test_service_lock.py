"""The service lease on a real PostgreSQL: one holder at a time, even when contenders arrive at once."""

from __future__ import annotations

import threading

import psycopg2
import pytest

from omnisphere_release.locks import Holder, ServiceBusy, ServiceLock

pytestmark = pytest.mark.integration


def holder(run: str) -> Holder:
    return Holder("release_auth-service", run, "preflight", f"release {run}")


def test_contenders_arriving_at_once_get_one_holder(scratch_database):
    lock = ServiceLock("auth-service", lambda: psycopg2.connect(scratch_database))
    start = threading.Barrier(8)
    won, refused = [], []

    def contend(run: str) -> None:
        start.wait()
        try:
            won.append(lock.acquire(holder(run), is_over=lambda _: False).holder.run_id)
        except ServiceBusy as exc:
            refused.append(exc.holder.run_id)

    threads = [threading.Thread(target=contend, args=(f"run-{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(won) == 1, (won, refused)
    assert refused == [won[0]] * 7  # every refusal names the one holder
    assert lock.holder().run_id == won[0]


def test_the_holders_run_keeps_it_and_only_it_releases_it(scratch_database):
    lock = ServiceLock("auth-service", lambda: psycopg2.connect(scratch_database))
    first = lock.acquire(holder("a"), is_over=lambda _: False)
    assert not first.already_held and first.holder.acquired_at is not None
    again = lock.acquire(Holder("release_auth-service", "a", "schema_up", "release a"), is_over=lambda _: False)
    assert again.already_held and again.holder.task_id == "preflight"  # a later task of the same run
    assert lock.release(holder("b")) is False  # another run cannot free it
    assert lock.holder().run_id == "a"
    assert lock.release(holder("a")) is True
    assert lock.holder() is None


def test_a_finished_holder_is_taken_over_and_asked_about_once(scratch_database):
    lock = ServiceLock("billing-service", lambda: psycopg2.connect(scratch_database))
    lock.acquire(holder("old"), is_over=lambda _: False)
    asked = []
    taken = lock.acquire(holder("new"), is_over=lambda h: asked.append(h.run_id) or True)
    assert asked == ["old"]
    assert taken.previous is not None and taken.previous.run_id == "old"
    assert lock.holder().run_id == "new"
    with pytest.raises(ServiceBusy, match=r"billing-service is held by release new \(run new of release_auth-service"):
        lock.acquire(holder("third"), is_over=lambda _: False)
