"""What `vlbatch status` says of workers and of the jobs the database calls running: running, paused, stalled, or
waiting in the inbox.

The database's `jobs.state = running` only says a worker started the job and has not finished it. Whether the
job is really running comes from its worker's heartbeat (batch.service.worker.heartbeat): a live worker on the job is
running it (or holding it paused: `vlbatch pause`); a worker that stopped beating has left it stalled until the
spool takes it back (its lease expires, or at once when a worker on the same host sees the process gone); a job
whose file is back in the inbox (handed back by a second stop signal, or taken back from a dead worker) waits
there for a worker to resume its run.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from batch.service.spool.spool import SEPARATOR, Claim, Spool
from batch.service.spool.standing import CLAIM_PREFIX
from batch.service.worker.heartbeat import worker_gone

RUNNING, PAUSED, STALLED, WAITING = "running", "paused", "stalled", "waiting"


def worker_view(row: dict[str, Any], now: datetime) -> dict[str, Any]:
    """A worker row as status shows it: its state, what it is on, and how long since it last beat."""
    last = datetime.fromisoformat(row["heartbeat_utc"]) if row.get("heartbeat_utc") else None
    return {
        "worker": row["id"],
        "command": row["command"],
        "state": row["state"],
        "job": row["job_id"],
        "file": row["file"],
        "model_id": row["model_id"],
        "started_utc": row["started_utc"],
        "heartbeat_utc": row["heartbeat_utc"],
        "heartbeat_age_s": None if last is None else max(0.0, round((now - last).total_seconds(), 1)),
        "gone": worker_gone(row, now),
    }


def job_liveness(job: dict[str, Any], worker: dict[str, Any] | None, spool: Spool, now: datetime) -> dict[str, Any]:
    """Whether a job the database calls running is running, paused, stalled (its worker gone) or waiting in the
    inbox for a worker to resume it.

    A worker with no row at all (a release before heartbeats) is judged by its claim's lease alone.
    """
    claim = job.get("claim") or ""
    standing = claim.startswith(CLAIM_PREFIX)
    claim_path = spool.work / claim if claim and not standing else None
    if worker is None:
        lease = _lease(spool, claim_path)
        alive = standing or (lease is not None and lease.expires > now.timestamp() and not lease.holder_is_gone())
        if alive:
            return {"state": RUNNING}
        if claim_path is not None and not os.path.lexists(claim_path):
            return {"state": WAITING}
        return _stalled(None, lease.expires if lease else None, standing)
    on_job = job["id"] in (worker.get("job_id") or "").split(", ")
    gone = worker_gone(worker, now)
    if not gone and on_job:
        return {"state": PAUSED if worker.get("state") == PAUSED else RUNNING}
    if claim_path is not None and not os.path.lexists(claim_path):
        return {"state": WAITING}  # its file went back to the inbox: the next worker resumes the run
    since = worker.get("stopped_utc") or worker.get("heartbeat_utc")  # its last sign of life
    if not gone:  # alive, but on other work: it lost this job (a hand-back that could not move the file)
        since = None
    lease = _lease(spool, claim_path)
    return _stalled(since, lease.expires if lease else None, standing)


def _stalled(since: str | None, lease_expires: float | None, standing: bool) -> dict[str, Any]:
    expires = None
    if lease_expires is not None:
        expires = datetime.fromtimestamp(lease_expires, timezone.utc).isoformat(timespec="milliseconds")
    return {"state": STALLED, "worker_gone_utc": since, "lease_expires_utc": expires, "standing": standing}


def _lease(spool: Spool, claim_path: Path | None) -> Any:
    if claim_path is None:
        return None
    return spool.read_lease(Claim(claim_path, claim_path.name.split(SEPARATOR, 1)[-1]))


def stalled_text(run: dict[str, Any], now: datetime) -> str:
    """`stalled (worker gone since 10:42:07; recovered when its lease expires at 10:42:31)`, in local time."""
    gone = f"worker gone since {local_clock(run['worker_gone_utc'])}" if run.get("worker_gone_utc") else "worker gone"
    if run.get("standing"):
        then = "the standing job's next pass carries it on"
    elif run.get("lease_expires_utc"):
        expires = run["lease_expires_utc"]
        past = datetime.fromisoformat(expires) <= now
        then = (
            f"its lease expired at {local_clock(expires)}: the next worker's turn takes it back"
            if past
            else f"recovered when its lease expires at {local_clock(expires)}, or sooner by a worker on its host"
        )
    else:
        then = "the next worker's turn takes it back"
    return f"stalled ({gone}; {then})"


def local_clock(utc: str | None) -> str:
    """A stored UTC time as the local wall clock, HH:MM:SS ("?" for none)."""
    return datetime.fromisoformat(utc).astimezone().strftime("%H:%M:%S") if utc else "?"
