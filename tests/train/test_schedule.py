"""Warmup + cosine learning-rate multiplier."""

from __future__ import annotations

import math

import pytest

from revival.train.schedule import warmup_cosine


def test_linear_warmup_then_cosine_to_the_floor():
    warmup, total, floor = 10, 110, 0.1
    assert warmup_cosine(0, warmup, total, floor) == pytest.approx(0.1)
    assert warmup_cosine(4, warmup, total, floor) == pytest.approx(0.5)
    assert warmup_cosine(9, warmup, total, floor) == pytest.approx(1.0)
    assert warmup_cosine(10, warmup, total, floor) == pytest.approx(1.0)
    assert warmup_cosine(60, warmup, total, floor) == pytest.approx((1 + floor) / 2)
    assert warmup_cosine(110, warmup, total, floor) == pytest.approx(floor)
    assert warmup_cosine(500, warmup, total, floor) == pytest.approx(floor)  # past the end: stays at the floor
    quarter = 10 + 25
    assert warmup_cosine(quarter, warmup, total, floor) == pytest.approx(floor + (1 - floor) * 0.5 *
                                                                         (1 + math.cos(math.pi / 4)))


def test_monotone_after_warmup_and_no_warmup():
    values = [warmup_cosine(s, 0, 50, 0.0) for s in range(51)]
    assert values[0] == 1.0 and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert all(0.0 <= v <= 1.0 for v in values)


def test_warmup_longer_than_training():
    assert warmup_cosine(3, 100, 10, 0.1) == pytest.approx(0.04)
