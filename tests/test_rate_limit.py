"""The rate limiter on a clock of the test's own: per second, per hour, per day, and a
slow-down asked by the server, without waiting for any of it."""

from __future__ import annotations

import threading

from qant_mail.delivery.transport import RateLimiter


class FakeTime(threading.Event):
    """A clock that moves only when someone waits on it (the limiter's stop event)."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__()
        self.now = start

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now

    def wait(self, timeout: float | None = None) -> bool:
        self.now += timeout or 0.0
        return False


def limiter(clock: FakeTime, **limits: float) -> RateLimiter:
    return RateLimiter(
        limits.get("per_second", 0),
        int(limits.get("per_hour", 0)),
        int(limits.get("per_day", 0)),
        clock=clock.monotonic,
        wall=clock.wall,
    )


def test_per_second_spaces_messages_evenly() -> None:
    clock = FakeTime()
    rate = limiter(clock, per_second=10)
    start = clock.now
    for _ in range(31):
        assert rate.acquire(clock) is not None
    assert 2.99 <= clock.now - start <= 3.01


def test_per_hour_waits_for_the_oldest_minute_to_fall_off() -> None:
    clock = FakeTime()
    rate = limiter(clock, per_hour=5)
    start = clock.now
    for _ in range(5):
        rate.acquire(clock)
    assert clock.now == start  # within the quota: no wait
    rate.acquire(clock)
    waited = clock.now - start
    assert 59 * 60 <= waited <= 61 * 60


def test_per_day_stops_at_the_quota_and_remembers_earlier_runs() -> None:
    clock = FakeTime()
    minute = int(clock.now // 60)
    # Two messages sent by a run earlier today, one yesterday.
    history = {minute - 60: 2, minute - 25 * 60: 1}
    rate = RateLimiter(0, 0, 3, history, clock=clock.monotonic, wall=clock.wall)
    assert rate.acquire(clock) is not None
    assert rate.acquire(clock) is None  # 3 today: the quota is used up


def test_a_slow_down_halves_the_rate_then_it_recovers() -> None:
    clock = FakeTime()
    rate = limiter(clock, per_second=20)
    rate.slow_down()
    assert rate.rate == 10
    clock.now += 0.5
    rate.slow_down()  # the same signal heard by another connection: counted once
    assert rate.rate == 10
    clock.now += 2
    rate.slow_down()
    assert rate.rate == 5
    for _ in range(3):
        clock.now += RateLimiter.RECOVERY
        rate.speed_up()
    assert rate.rate == 20


def test_a_stop_ends_a_wait() -> None:
    clock = FakeTime()
    rate = limiter(clock, per_second=1)
    rate.acquire(clock)
    stop = threading.Event()
    stop.set()
    assert rate.acquire(stop) is None
