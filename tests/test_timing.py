"""`sinkkernels.timing.profile_call` on the CPU: the busy time's arithmetic, and work on other threads counted (the
engine runs its passes on a worker thread)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from sinkkernels.timing import busy_seconds, count_launches, profile_call

CPU = torch.device("cpu")


@pytest.mark.parametrize(("intervals", "busy"), [
    ([], 0.0),
    ([(0.0, 2.0), (5.0, 6.0)], 3.0),  # disjoint
    ([(1.0, 4.0), (0.0, 2.0)], 4.0),  # overlapping, out of order
    ([(0.0, 10.0), (2.0, 3.0), (4.0, 5.0)], 10.0),  # nested
    ([(0.0, 1.0), (1.0, 2.0)], 2.0),  # touching
    ([(0.0, 3.0), (1.0, 2.0), (2.5, 4.0), (6.0, 7.0)], 5.0),  # nested, then overlapping the outer one
])
def test_busy_time_is_the_union_of_the_intervals(intervals, busy):
    assert busy_seconds(intervals) == pytest.approx(busy)


def test_the_operators_of_a_worker_thread_are_counted_and_views_are_not():
    a = torch.randn(256, 256)
    with ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(torch.ones, 1).result()  # the thread exists before profiling, as the engine's does
        result, activity = profile_call(lambda: worker.submit(lambda: (a @ a).relu().t().sum()).result(), CPU)
    assert result == (a @ a).relu().sum()
    assert activity.launches == 3  # matmul, relu, sum: not the transpose, nor what matmul calls inside
    assert 0 < activity.busy_s <= activity.wall_s and 0 < activity.busy_fraction <= 1


def test_count_launches_is_the_profiles_count():
    a = torch.randn(8, 8)
    assert count_launches(lambda: (a + a) * a, CPU) == 2
