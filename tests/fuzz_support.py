"""Hypothesis profiles and a hard per-example time limit, shared by the property-based tests (tests/test_fuzz_*.py).

Profiles, chosen with HYPOTHESIS_PROFILE (default ``ci``; nothing of the caller's VLBATCH_* environment counts):

- ``ci``: about 500 examples per boundary, a deadline per example, the same examples on every run
  (derandomized); the whole of tests/test_fuzz_*.py in about a minute on two cores;
- ``long``: 20 000 examples per boundary (HYPOTHESIS_PROFILE=long; an hour or more), for a night's run;
- ``dev``: 50 examples, for a quick look while editing a parser.

No example database is written (the repository's tree stays clean): a failure prints the falsifying example and
a ``@reproduce_failure`` blob instead.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from datetime import timedelta

from hypothesis import HealthCheck, settings

PROFILE_VARIABLE = "HYPOTHESIS_PROFILE"
CI_EXAMPLES = 500
LONG_EXAMPLES = 20_000
HARD_LIMIT_SECONDS = 10.0  # an example still running after this is a hang: failed, whatever the profile

_COMMON = {
    # the examples make their own temp folders; the autouse `isolated` fixture (a function-scoped chdir) is harmless
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    "database": None,
    "print_blob": True,
}
# ci: the same examples on every run (derandomized), so a red CI is the change's doing and reproduces as it is;
# the long profile draws new ones each time, to find what the fixed set does not
settings.register_profile("ci", max_examples=CI_EXAMPLES, deadline=timedelta(seconds=5), derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=LONG_EXAMPLES, deadline=timedelta(seconds=5), **_COMMON)
settings.register_profile("dev", max_examples=50, deadline=timedelta(seconds=2), **_COMMON)
settings.load_profile(os.environ.get(PROFILE_VARIABLE) or "ci")


def examples(ci: int) -> int:
    """Examples for one boundary: `ci` under the ci profile, the profile's own count otherwise (long: 20 000)."""
    current = settings.default.max_examples
    return ci if current == CI_EXAMPLES else max(current * ci // CI_EXAMPLES, 1)


class Hang(BaseException):
    """An example that ran past HARD_LIMIT_SECONDS (a parser stuck in a loop, say).

    A BaseException, so that no `except Exception` of the code under test can turn it into an ordinary refusal;
    hard_limit reports it as an AssertionError, which Hypothesis shrinks and prints.
    """


@contextlib.contextmanager
def hard_limit(seconds: float = HARD_LIMIT_SECONDS) -> Iterator[None]:
    """Fail the example with Hang once it runs `seconds` of wall time (SIGALRM: the main thread, Linux and macOS).

    Hypothesis's deadline only judges an example after it returns; this one stops an example that never does.
    """

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"the example ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except Hang as exc:
        raise AssertionError(f"hang: {exc}") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
