"""The replicator's failure ladder and its backoff, as pure functions."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError

from conversation._engine.replicator import MAX_UNEXPECTED_FAILURES, Verdict, judge_failure
from conversation._redis.retry import Backoff


@pytest.mark.parametrize(
    "error",
    [RedisConnectionError("reset"), TimeoutError(), OutOfMemoryError("OOM"), ResponseError("BUSY")],
)
def test_a_redis_fault_is_retried(error: Exception) -> None:
    assert judge_failure(error, unexpected=0, durable_deadline=None, now=5.0) is Verdict.RETRY


def test_a_script_error_no_retry_can_fix_gives_up() -> None:
    error = ResponseError("ERR Error running script: bad argument")
    assert judge_failure(error, unexpected=0, durable_deadline=None, now=0.0) is Verdict.GIVE_UP


def test_a_bug_is_retried_until_the_limit_then_given_up() -> None:
    bug = AttributeError("'NoneType' object has no attribute 'writelines'")
    for attempt in range(1, MAX_UNEXPECTED_FAILURES):
        assert judge_failure(bug, unexpected=attempt, durable_deadline=None, now=0.0) is (
            Verdict.RETRY
        )
    limit = MAX_UNEXPECTED_FAILURES
    assert judge_failure(bug, unexpected=limit, durable_deadline=None, now=0.0) is Verdict.GIVE_UP


def test_a_durable_write_is_withdrawn_at_its_deadline_and_never_given_up() -> None:
    fault = RedisConnectionError("reset")
    assert judge_failure(fault, unexpected=0, durable_deadline=10.0, now=9.9) is Verdict.RETRY
    assert judge_failure(fault, unexpected=0, durable_deadline=10.0, now=10.0) is Verdict.ABANDON
    bug = KeyError("x")
    limit = MAX_UNEXPECTED_FAILURES
    # Its DurabilityError names the key to re-send with, so it is withdrawn, not failed.
    assert judge_failure(bug, unexpected=limit, durable_deadline=99.0, now=0.0) is Verdict.ABANDON


def test_the_backoff_doubles_up_to_its_longest_delay_with_jitter_in_half_to_whole() -> None:
    backoff = Backoff(0.05, 2.0)
    assert [backoff.delay(n, jitter=0.999999) for n in (1, 2, 3)] == pytest.approx(
        [0.05, 0.1, 0.2], rel=1e-5
    )
    assert backoff.delay(30, jitter=0.999999) == pytest.approx(2.0, rel=1e-5)
    assert backoff.delay(1, jitter=0.0) == pytest.approx(0.025)
    assert all(0.025 <= backoff.delay(1) <= 0.05 for _ in range(100))


def test_the_backoff_never_overflows_in_a_long_outage() -> None:
    backoff = Backoff(0.0, 0.0)  # a caller that wants no pause at all
    assert backoff.delay(100_000) == 0.0
    assert Backoff(0.05, 2.0).delay(100_000, jitter=0.5) == pytest.approx(1.5)
