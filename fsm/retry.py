"""How hard one run tries a downstream call: attempts, backoff, the forward-step deadline and
the pauses of a parked order or a failed run. Pure configuration plus a tenacity stop
condition."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from tenacity import RetryCallState
from tenacity.stop import stop_base

from fsm.settings import Settings

# The "call" under which a run ended by an unexpected error is noted on its order (its
# count, error and next run): the executor writes it, `fsm.why` explains it.
CRASHED_RUN = "order:run"


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4  # per call, per run
    backoff_base: float = 0.05  # seconds; full jitter, doubling
    backoff_max: float = 2.0
    step_deadline: float = 60.0  # a forward step unknown this long is treated as failed
    # A parked order is retried by the sweep after park_min x 2^(parks - 1), at most park_max.
    park_min: float = 300.0
    park_max: float = 3600.0
    # The order's own deadline after creation (None: none): past it, it stops waiting.
    order_deadline: float | None = None

    @property
    def breaker_patience(self) -> float:
        """How long a compensation's call waits on an open circuit breaker in one run before
        the run gives up on it and the order parks (fsm.breaker): as long as the run's own
        retries of it could take, MAX_ATTEMPTS x BACKOFF_MAX (8 s by default). A forward
        step waits until its deadline instead."""
        return self.max_attempts * self.backoff_max

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        return cls(
            max_attempts=settings.max_attempts,
            backoff_base=settings.backoff_base,
            backoff_max=settings.backoff_max,
            step_deadline=settings.step_deadline,
            park_min=settings.park_min,
            park_max=settings.park_max,
            order_deadline=settings.order_deadline,
        )


def doubling(base: float, cap: float, n: int) -> float:
    """The n-th of waits doubling from `base` (n = 1: `base`), at most `cap`, for any n: the
    exponent stops growing long before `2.0 ** n` would overflow (after ~1,000 parks or
    delivery attempts; by then every wait is `cap`)."""
    return min(cap, base * 2.0 ** min(max(0, n - 1), 1000))


class stop_at(stop_base):  # noqa: N801  (named like tenacity's own stop conditions)
    """Stop retrying once a wall-clock deadline (persisted on the order) has passed."""

    def __init__(self, deadline: datetime | None) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and datetime.now(UTC) >= self.deadline
