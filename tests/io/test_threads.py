"""Work on threads: results in order, bounded memory, errors where they happened."""

import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from deepdark.io.threads import PerThread, in_flight, ordered_map, resolve_threads, shared_cores, threads_within


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_results_come_back_in_the_order_of_the_items(threads):
    delays = np.random.default_rng(0).uniform(0, 0.004, 40)

    def slow_square(i):
        time.sleep(delays[i])
        return i * i

    assert list(ordered_map(slow_square, range(40), threads)) == [i * i for i in range(40)]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_items_held_at_once_stay_within_in_flight(threads):
    drawn, done, held = [0], [0], []

    def items():
        for i in range(30):
            drawn[0] += 1
            held.append(drawn[0] - done[0])
            yield i

    for _ in ordered_map(lambda i: time.sleep(0.001), items(), threads):
        done[0] += 1
    assert max(held) <= in_flight(threads)


def test_an_error_is_raised_in_order_and_what_follows_is_not_started():
    started = []

    def work(i):
        started.append(i)
        if i == 5:
            raise ValueError("item 5")
        time.sleep(0.002)
        return i

    seen = []
    with pytest.raises(ValueError, match="item 5"):
        for r in ordered_map(work, range(100), 2):
            seen.append(r)
    assert seen == [0, 1, 2, 3, 4]
    assert max(started) < 5 + in_flight(2)


def test_every_started_item_has_finished_when_an_error_reaches_the_caller():
    """What the caller cleans up after an error (a scratch file) is no longer in use."""
    running = []

    def work(i):
        running.append(i)
        time.sleep(0 if i == 0 else 0.01)
        running.remove(i)
        if i == 0:
            raise ValueError("item 0")

    with pytest.raises(ValueError, match="item 0"):
        list(ordered_map(work, range(20), 3))
    assert running == []


def test_each_thread_gets_its_own_object_and_all_are_summed():
    counts = PerThread(lambda: np.zeros(3, np.int64))

    def add(i):
        counts.get()[i % 3] += 1
        time.sleep(0.001)

    list(ordered_map(add, range(60), 3))
    assert 1 <= len(counts.made) <= 3
    np.testing.assert_array_equal(sum(counts.made), [20, 20, 20])
    assert len({id(c) for c in counts.made}) == len(counts.made)


def test_threads_default_to_the_cores_this_process_may_use():
    assert resolve_threads(None) >= 1
    assert resolve_threads(3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        resolve_threads(0)


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_blas_runs_one_thread_each_while_threads_share_the_cores():
    if not _blas_threads():
        pytest.skip("threadpoolctl finds no BLAS")
    with threadpool_limits(limits=2, user_api="blas"):  # more than one before, whatever the machine
        _blas_runs_one_thread_each()


def _blas_runs_one_thread_each():
    before = _blas_threads()
    assert all(n == 2 for n in before)
    seen = list(ordered_map(lambda _: _blas_threads(), range(4), 2))
    assert all(n == 1 for threads in seen for n in threads)
    assert _blas_threads() == before  # restored once the threads are done
    with shared_cores(1):
        assert _blas_threads() == before


def test_threads_within_a_budget_are_the_most_that_fit():
    def per_thread_mb(t):
        return 100 * in_flight(t)

    assert threads_within(8, per_thread_mb, 450) == 2  # 2 threads hold 4 items; 3 would hold 5
    assert threads_within(8, per_thread_mb, 10) == 1  # never fewer than one
    assert threads_within(3, per_thread_mb, 10**9) == 3  # never more than asked
