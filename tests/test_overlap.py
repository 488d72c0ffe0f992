"""The harvest's threads: jobs behind the forward run in order, one in flight, and a job's error surfaces
unchanged in the caller with no later job run; packing ahead yields everything in order and stops."""

from __future__ import annotations

import threading
import time

import pytest

from saepipe.errors import SaepipeError
from saepipe.harvest.overlap import Behind, ahead


def test_jobs_run_behind_the_caller_in_order_one_at_a_time():
    log: list[tuple[str, int, str]] = []
    running = threading.Event()
    release = threading.Event()

    def job(i: int) -> None:
        log.append(("start", i, threading.current_thread().name))
        if i == 0:
            running.set()
            release.wait(5)
        log.append(("end", i, threading.current_thread().name))

    with Behind() as behind:
        behind.submit(job, 0)
        assert running.wait(5)
        # The caller goes on while job 0 runs: this is the overlap with the next forward.
        assert ("end", 0, log[0][2]) not in log
        release.set()
        for i in range(1, 5):
            behind.submit(job, i)  # waits for the previous job first: one in flight
    assert [(kind, i) for kind, i, _ in log] == [(k, i) for i in range(5) for k in ("start", "end")]
    assert {name for *_, name in log} != {threading.current_thread().name}, "jobs ran in the caller"


def test_a_job_error_surfaces_unchanged_and_no_later_job_runs():
    ran: list[int] = []
    boom = SaepipeError("store s: No space left on device while writing contexts [8, 16)")

    def job(i: int) -> None:
        if i == 1:
            raise boom
        ran.append(i)

    with pytest.raises(SaepipeError) as caught, Behind() as behind:
        for i in range(4):
            behind.submit(job, i)
    assert caught.value is boom  # the very exception: the CLI prints its one line as if raised inline
    assert ran == [0]


def test_the_last_jobs_error_surfaces_when_leaving():
    def job() -> None:
        raise SaepipeError("the model produced NaN/inf at hook h in context 3")

    with pytest.raises(SaepipeError, match="context 3"), Behind() as behind:
        behind.submit(job)


def test_caller_error_waits_for_the_job_in_flight_and_drops_the_rest():
    done = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        done.set()

    with pytest.raises(KeyboardInterrupt), Behind() as behind:
        behind.submit(slow)
        raise KeyboardInterrupt
    assert done.is_set()  # a write already started is never cut short by the harvester itself


def test_sync_switch_runs_jobs_inline(monkeypatch):
    monkeypatch.setenv("SAEPIPE_SYNC_HARVEST", "1")
    names: list[str] = []
    with Behind() as behind:
        behind.submit(lambda: names.append(threading.current_thread().name))
    assert names == [threading.current_thread().name]
    assert list(ahead(iter(range(3)))) == [0, 1, 2]


def test_ahead_yields_every_item_in_order_from_another_thread():
    names: set[str] = set()

    def items():
        for i in range(50):
            names.add(threading.current_thread().name)
            yield i

    assert list(ahead(items(), depth=2)) == list(range(50))
    assert names == {"saepipe-pack"}


def test_ahead_raises_the_producers_error_after_its_items():
    def items():
        yield from range(3)
        raise SaepipeError("--dataset d is not UTF-8 text")

    got = []
    with pytest.raises(SaepipeError, match="UTF-8"):
        for x in ahead(items()):
            got.append(x)
    assert got == [0, 1, 2]


def test_ahead_stays_bounded_and_stops_when_closed():
    produced = []

    def items():
        for i in range(1000):
            produced.append(i)
            yield i

    it = ahead(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.3)
    assert len(produced) <= 4  # one taken, two queued, one waiting to be queued: memory stays flat
    it.close()
    n = len(produced)
    time.sleep(0.3)
    assert len(produced) == n  # the producer stopped


def test_ahead_leaves_no_thread_behind_when_closed_after_the_producer_finished():
    # The producer has yielded everything and waits to hand over its end marker into a full queue; closing
    # the consumer must let it go instead of leaving it blocked (and the close waiting for it).
    it = ahead(iter(range(2)), depth=1)
    assert next(it) == 0
    time.sleep(0.3)  # the producer is done with its items: 1 queued, the end marker waiting behind it
    it.close()
    assert not [t for t in threading.enumerate() if t.name == "saepipe-pack" and t.is_alive()]
