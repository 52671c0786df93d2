"""The agent's progress budget (pure): each copy's share of the refreshes per second."""

from __future__ import annotations

import pytest

from blockcopy.core.pace import ProgressPace


@pytest.mark.parametrize(("copying", "expected"), [(0, 1.0), (1, 1.0), (10, 1.0), (11, 1.1),
                                                   (50, 5.0), (200, 20.0)])
def test_each_copy_gets_its_share_never_more_often_than_the_interval(copying, expected):
    pace = ProgressPace(interval=1.0, budget=10.0, copying=lambda: copying)
    assert pace.interval() == pytest.approx(expected)


def test_a_longer_status_interval_wins_over_the_share():
    assert ProgressPace(interval=10.0, budget=10.0, copying=lambda: 50).interval() == 10.0


def test_no_budget_is_the_status_interval_alone():
    assert ProgressPace(interval=0.5, budget=0, copying=lambda: 1000).interval() == 0.5


def test_the_count_is_asked_each_time():
    copying = [1]
    pace = ProgressPace(interval=1.0, budget=2.0, copying=lambda: copying[0])
    assert pace.interval() == 1.0
    copying[0] = 8
    assert pace.interval() == 4.0


def test_negative_values_are_refused():
    with pytest.raises(ValueError):
        ProgressPace(interval=1.0, budget=-1)
