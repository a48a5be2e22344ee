"""The states a job and its runs go through, and the one retry policy the worker, store and reports share."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class JobState(str, Enum):
    """A job's (and a run's) state in the database; the finished ones are also the spool folders it ends in."""

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self is not JobState.RUNNING


# what a worker did with a job file it took, beyond the database states: returned it to the inbox alive
HANDED_BACK = "handed_back"
# ... or found that another worker had taken it over meanwhile (it was suspended past its lease): left alone
CLAIM_LOST = "claim_lost"


@dataclass(frozen=True)
class RetryPolicy:
    """When a job or a unit is tried again and when it is given up.

    - a job whose worker died (its lease ran out) starts again, up to `max_attempts` starts;
    - a unit in which the worker process itself died `unit_deaths` times is recorded as failed and skipped;
    - a hand-back by a live worker (a stop signal, a fault of the machine) is not an attempt;
    - faults of the machine are retried after `first_backoff_s`, doubling up to `max_backoff_s`, and
      `vlbatch run` gives up after `give_up_s` of nothing but faults.
    """

    max_attempts: int = 3
    unit_deaths: int = 2
    first_backoff_s: float = 0.5
    max_backoff_s: float = 60.0
    give_up_s: float = 300.0

    def exhausted(self, attempts: int) -> bool:
        return attempts > self.max_attempts

    def skip_unit(self, deaths: int) -> bool:
        return deaths >= self.unit_deaths
