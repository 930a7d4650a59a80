"""The back-off schedule of a ``RetryConfig``: pure, never sleeps."""

from __future__ import annotations

import random

from ._definition import RetryConfig

__all__ = ["delay_ms", "is_retryable"]


def delay_ms(config: RetryConfig, failed_attempt: int, rng: random.Random | None = None) -> float:
    """Milliseconds to wait after attempt ``failed_attempt`` (1-based) failed.

    ``initial_delay_ms * backoff_multiplier ** (failed_attempt - 1)``, capped at
    ``max_delay_ms``, then spread uniformly by ± ``jitter`` of itself.
    """
    try:
        base = config.initial_delay_ms * config.backoff_multiplier ** (failed_attempt - 1)
    except OverflowError:  # past the float range after many attempts: the cap applies
        base = config.max_delay_ms if config.initial_delay_ms > 0 else 0.0
    base = min(base, config.max_delay_ms)
    if config.jitter:
        spread = base * config.jitter
        base += (rng or random).uniform(-spread, spread)
    return max(base, 0.0)


def is_retryable(config: RetryConfig, error: str) -> bool:
    """Whether ``error`` may be retried: always, unless ``retryable_errors`` filters it."""
    if config.retryable_errors is None:
        return True
    return any(fragment in error for fragment in config.retryable_errors)
