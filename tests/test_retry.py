"""The pure back-off schedule and the retryable-error filter."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from twinklr_pipe import RetryConfig
from twinklr_pipe._retry import delay_ms, is_retryable


class TestDelay:
    def test_delay_grows_exponentially(self) -> None:
        """initial_delay_ms * backoff_multiplier ** (attempt - 1)."""
        config = RetryConfig(max_attempts=5, initial_delay_ms=10, backoff_multiplier=2)
        assert [delay_ms(config, n) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]

    def test_default_schedule(self) -> None:
        """The defaults wait 1 s, then 2 s, then 4 s."""
        config = RetryConfig()
        assert [delay_ms(config, n) for n in (1, 2, 3)] == [1000, 2000, 4000]

    def test_delay_is_capped(self) -> None:
        """No wait exceeds max_delay_ms."""
        config = RetryConfig(initial_delay_ms=100, backoff_multiplier=10, max_delay_ms=5000)
        assert [delay_ms(config, n) for n in (1, 2, 3, 4)] == [100, 1000, 5000, 5000]

    def test_a_huge_attempt_number_is_capped_not_overflowing(self) -> None:
        """Attempt 5,000 waits max_delay_ms instead of raising OverflowError."""
        assert delay_ms(RetryConfig(initial_delay_ms=10), 5_000) == 60_000
        assert delay_ms(RetryConfig(initial_delay_ms=0), 5_000) == 0

    def test_multiplier_one_is_constant(self) -> None:
        """A multiplier of 1 retries at a constant pace."""
        config = RetryConfig(initial_delay_ms=50, backoff_multiplier=1)
        assert {delay_ms(config, n) for n in range(1, 10)} == {50}

    def test_jitter_stays_within_its_fraction(self) -> None:
        """With jitter j every delay lies in [d * (1 - j), d * (1 + j)] and they vary."""
        config = RetryConfig(initial_delay_ms=100, backoff_multiplier=2, jitter=0.25)
        rng = random.Random(7)
        for attempt, base in ((1, 100), (2, 200), (3, 400)):
            samples = [delay_ms(config, attempt, rng) for _ in range(300)]
            assert all(base * 0.75 <= s <= base * 1.25 for s in samples)
            assert max(samples) - min(samples) > base * 0.25

    def test_jitter_is_deterministic_with_a_seeded_rng(self) -> None:
        """The same seed gives the same schedule."""
        config = RetryConfig(initial_delay_ms=100, jitter=0.5)
        first = [delay_ms(config, n, random.Random(3)) for n in (1, 2, 3)]
        again = [delay_ms(config, n, random.Random(3)) for n in (1, 2, 3)]
        assert first == again

    def test_full_jitter_never_goes_negative(self) -> None:
        """Jitter of 1.0 can reach zero, never below."""
        config = RetryConfig(initial_delay_ms=10, jitter=1.0)
        rng = random.Random(0)
        assert all(delay_ms(config, 1, rng) >= 0 for _ in range(500))


class TestRetryable:
    def test_every_error_is_retryable_by_default(self) -> None:
        """retryable_errors=None retries everything."""
        assert is_retryable(RetryConfig(), "ValueError: anything")

    def test_only_matching_errors_are_retryable(self) -> None:
        """retryable_errors are substrings of the error text."""
        config = RetryConfig(retryable_errors=["TimeoutError", "rate limit"])
        assert is_retryable(config, "TimeoutError: read")
        assert is_retryable(config, "HTTPError: 429 rate limit exceeded")
        assert not is_retryable(config, "ValueError: bad input")

    def test_an_empty_filter_retries_nothing(self) -> None:
        """retryable_errors=[] matches no error."""
        assert not is_retryable(RetryConfig(retryable_errors=[]), "TimeoutError")


class TestRetryConfig:
    def test_unknown_fields_are_rejected(self) -> None:
        """A misspelt option is an error, not silently ignored."""
        with pytest.raises(ValidationError):
            RetryConfig(max_attempt=3)  # type: ignore[call-arg]
