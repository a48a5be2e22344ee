"""A Hypothesis state machine over a real spool folder: no job is ever lost or doubled, whatever the order of events.

Rules: submit (a job file written the way `vlbatch submit` does: a hidden temp name, then a rename into the inbox),
claim (pending + claim), crash (a worker killed: its claim is forgotten, its lease left behind), expire (a lease
rewritten into the past), recover (abandoned claims released back to the inbox), renew, release (a live hand-back)
and finish (done, failed, rejected or cancelled). After every step every submitted job is in exactly one place:
inbox/, work/, done/, failed/, rejected/ or cancelled/. The model plays no part: the jobs' contents do not matter.

HYPOTHESIS_PROFILE=long runs many more sequences (tests/fuzz_support.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from fuzz_support import examples
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from batch.service.spool.spool import LEASE, REASON_SUFFIX, Claim, Spool, is_job_name
from batch.service.spool.states import JobState

FINISHED = [state for state in JobState if state.finished]  # done, failed, rejected, cancelled
PLACES = ("inbox", "work", *(state.value for state in FINISHED))
# names that collide once suffixes are added (free_path), with case and suffix variants
NAMES = ["a.yaml", "a.yml", "A.yaml", "a.1.yaml", "job--x.yaml", "b c.yaml"]


class SpoolMachine(RuleBasedStateMachine):
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="vlbatch-fuzz-spool-"))
        # settle_seconds=0: a file is ready to claim at once; lease_seconds long enough that only `expire` ends one
        self.spool = Spool(self.tmp / "spool", lease_seconds=60.0, settle_seconds=0.0).ensure()
        self.submitted: set[str] = set()  # the token written into each job submitted
        self.held: dict[Path, str] = {}  # claims a live worker holds: work path -> token
        self.serial = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------------------------

    def _locations(self) -> dict[str, list[str]]:
        """token -> the places holding a job file with it (a job file's bytes name its token)."""
        found: dict[str, list[str]] = {}
        for place in PLACES:
            for entry in os.scandir(self.spool.root / place):
                if entry.name.endswith((LEASE, REASON_SUFFIX)) or entry.name.startswith("."):
                    continue
                if place != "work" and not is_job_name(entry.name):
                    continue
                token = json.loads(Path(entry.path).read_text(encoding="utf-8"))["token"]
                found.setdefault(token, []).append(place)
        return found

    def _pending(self) -> list[Path]:
        ready, _ = self.spool.pending(now=time.time() + 3600)  # wall clock far ahead: every file counts as old
        return ready

    # -- rules --------------------------------------------------------------------------------------------------

    @rule(name=st.sampled_from(NAMES))
    def submit(self, name: str) -> None:
        """Like `vlbatch submit`: write under a hidden temp name the worker ignores, then rename to a free name."""
        self.serial += 1
        token = f"job-{self.serial}"
        tmp = self.spool.inbox / f".{name}.{token}.tmp"
        tmp.write_text(json.dumps({"token": token}), encoding="utf-8")  # JSON is YAML: the contents do not matter
        target = self.spool.inbox / name
        n = 1
        while target.exists():  # free_path, as submit_job does
            stem, _, suffix = name.rpartition(".")
            target = self.spool.inbox / f"{stem}.{n}.{suffix}"
            n += 1
        os.rename(tmp, target)
        self.submitted.add(token)

    @rule(target=claims, index=st.integers(0, 10))
    def claim(self, index: int) -> Claim | None:
        ready = self._pending()
        if not ready:
            return None
        path = ready[index % len(ready)]
        token = json.loads(path.read_text(encoding="utf-8"))["token"]
        claim = self.spool.claim(path)
        assert claim is not None, f"{path} was pending but could not be claimed"
        assert claim.path.parent == self.spool.work and claim.name == path.name
        assert self.spool.read_lease(claim) is not None, "a claim without a lease"
        self.held[claim.path] = token
        return claim

    @rule(claim=consumes(claims))
    def crash(self, claim: Claim | None) -> None:
        """The worker holding it is killed: nothing is released, the lease stays until it runs out."""
        if claim is not None:
            self.held.pop(claim.path, None)

    @rule(claim=claims)
    def renew(self, claim: Claim | None) -> None:
        if claim is not None and claim.path in self.held:
            self.spool.renew(claim)
            lease = self.spool.read_lease(claim)
            assert lease is not None and lease.expires > time.time()

    @rule(index=st.integers(0, 10))
    def expire(self, index: int) -> None:
        """One lease in work/ runs out (rewritten into the past), held by a live worker or not."""
        leases = sorted(self.spool.work.glob("*" + LEASE))
        if leases:
            lease = leases[index % len(leases)]
            data = json.loads(lease.read_text())
            lease.write_text(json.dumps({**data, "expires": time.time() - 1}))
            self.held.pop(lease.with_name(lease.name[: -len(LEASE)]), None)  # its worker lost it

    @rule()
    def recover(self) -> None:
        """What a worker does at start and on every pass: abandoned claims go back to the inbox."""
        abandoned = self.spool.abandoned()
        for claim in abandoned:
            assert claim.path not in self.held, f"a live worker's claim was taken back: {claim.path.name}"
            target = self.spool.release(claim)
            assert target.parent == self.spool.inbox and target.exists()
            assert not claim.lease_path.exists()

    @rule(claim=consumes(claims))
    def release(self, claim: Claim | None) -> None:
        """A live worker hands its job back (a stop signal)."""
        if claim is not None and self.held.pop(claim.path, None) is not None:
            target = self.spool.release(claim)
            assert target.parent == self.spool.inbox

    @rule(claim=consumes(claims), state=st.sampled_from(FINISHED), reason=st.none() | st.text(max_size=20))
    def finish(self, claim: Claim | None, state: JobState, reason: str | None) -> None:
        if claim is not None and self.held.pop(claim.path, None) is not None:
            target = self.spool.finish(claim, state, reason)
            assert target.parent == self.spool.root / state.value and target.exists()
            assert not claim.path.exists() and not claim.lease_path.exists()

    # -- invariants ---------------------------------------------------------------------------------------------

    @invariant()
    def every_job_is_in_exactly_one_place(self) -> None:
        locations = self._locations()
        lost = self.submitted - set(locations)
        doubled = {token: places for token, places in locations.items() if len(places) > 1}
        unknown = set(locations) - self.submitted
        assert not lost, f"jobs lost: {sorted(lost)}"
        assert not doubled, f"jobs in more than one place: {doubled}"
        assert not unknown, f"job files nobody submitted: {sorted(unknown)}"

    @invariant()
    def live_claims_are_in_work_with_a_lease(self) -> None:
        for path in self.held:
            assert path.exists(), f"a live worker's claim vanished: {path.name}"
            assert path.with_name(path.name + LEASE).exists(), f"a live claim without a lease: {path.name}"

    @invariant()
    def counts_agree(self) -> None:
        counts = self.spool.counts()
        by_place = {place: 0 for place in PLACES}
        for places in self._locations().values():
            by_place[places[0]] += 1
        assert counts == by_place, (counts, by_place)


SpoolMachine.TestCase.settings = settings(
    settings.default, max_examples=examples(300), stateful_step_count=40, deadline=None
)
test_spool_state_machine = SpoolMachine.TestCase
