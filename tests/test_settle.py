"""batch.service.spool.settle and the spool's use of it: real writer processes, real open descriptors, real leases."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch.service.spool.settle import (
    COMPLETE,
    WRITING,
    SettleTracker,
    is_partial_name,
    open_for_writing,
)
from batch.service.spool.spool import Spool
from batch.service.spool.states import JobState

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="leases are a Linux feature")

HOLDER = """
import sys, time
fh = open(sys.argv[1], sys.argv[2])
print("open", flush=True)
sys.stdin.readline()
"""


def holder(path: Path, mode: str) -> subprocess.Popen:
    """Another process holding `path` open in `mode` until its stdin is closed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline() == b"open\n"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(10) == 0


def old(path: Path, seconds: float = 3600) -> Path:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)
    return path


def test_partial_names():
    for name in [".job.yaml", ".job.yaml.Xa81kq", ".#job.yaml", "job.yaml.tmp", "job.yaml.part", "clip.mp4.PART",
                 "photo.jpg.crdownload", "job.yaml~", "job.yaml.swp", "clip.mp4.filepart", "a.partial"]:  # fmt: skip
        assert is_partial_name(name), name
    for name in ["job.yaml", "photo.jpg", "tmp.yaml", "part.png", "job.yaml.txt"]:
        assert not is_partial_name(name), name


@linux_only
def test_a_writer_holding_the_file_open_is_seen_and_a_reader_is_not(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("prompt: hi\n")
    assert open_for_writing(path) is False
    with open(path, "a") as fh:  # this process
        assert open_for_writing(path) is True
        fh.write("x")
    assert open_for_writing(path) is False
    for mode, held in [("a", True), ("r+", True), ("r", False)]:  # another process
        proc = holder(path, mode)
        try:
            assert open_for_writing(path) is held, mode
        finally:
            release(proc)
        assert open_for_writing(path) is False
    fd = os.open(path, os.O_WRONLY)  # a bare descriptor, never written through
    try:
        assert open_for_writing(path) is True
    finally:
        os.close(fd)
    assert path.read_text() == "prompt: hi\nx"  # nothing was read or changed by asking


@linux_only
def test_what_cannot_be_known_is_none(tmp_path):
    target = tmp_path / "target.yaml"
    target.write_text("prompt: hi\n")
    (tmp_path / "link.yaml").symlink_to(target)
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "folder.yaml").mkdir()
    for name in ["link.yaml", "fifo.yaml", "folder.yaml", "missing.yaml"]:
        started = time.monotonic()
        assert open_for_writing(tmp_path / name) is None, name
        assert time.monotonic() - started < 1.0  # a FIFO without a writer never blocks the question


@linux_only
def test_a_file_of_another_user_cannot_be_asked_about():
    """A read lease needs the file's owner or CAP_LEASE: EACCES, so None (a shared inbox then waits as before)."""
    passwd = Path("/etc/passwd")
    if not passwd.exists():
        pytest.skip("no /etc/passwd, a file of another user that everyone can read")
    code = f"from batch.service.spool.settle import open_for_writing; print(open_for_writing({str(passwd)!r}))"
    if os.geteuid() != 0:
        if passwd.stat().st_uid == os.geteuid():
            pytest.skip("/etc/passwd is this user's own")
        assert open_for_writing(passwd) is None
        return
    # root holds CAP_LEASE: ask from a child that runs as nobody instead (settle.py needs only the standard
    # library, so any Python that nobody may run will do: this venv's may live in root's home)
    repo = Path(__file__).resolve().parents[1]
    problems = []
    for python in dict.fromkeys([sys.executable, shutil.which("python3"), "/usr/bin/python3"]):
        if not python:
            continue
        try:
            out = subprocess.run(
                [python, "-c", code],
                user=65534,
                group=65534,
                extra_groups=[],
                cwd="/",
                env={"PYTHONPATH": str(repo), "PATH": os.environ.get("PATH", "")},
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            problems.append(f"{python}: {exc}")
            continue
        if out.returncode == 0:
            assert out.stdout.strip() == "None"
            return
        problems.append(f"{python}: {out.stderr.strip()[-200:]}")
    pytest.skip(f"no Python runs as nobody here: {problems}")


@linux_only
@pytest.mark.slow
def test_a_writer_opening_while_the_lease_is_held_neither_waits_nor_kills_the_asker(tmp_path):
    """A lease break signals the lease holder (SIGIO by default, which would end it): hammer that race for 2 s."""
    path = tmp_path / "busy.yaml"
    path.write_text("x")
    writer = (
        "import os, sys, time\n"
        "end, worst = time.monotonic() + 2, 0.0\n"
        "while time.monotonic() < end:\n"
        "    t = time.monotonic(); fd = os.open(sys.argv[1], os.O_WRONLY); worst = max(worst, time.monotonic() - t)\n"
        "    os.close(fd)\n"
        "print(worst)\n"
    )
    asker = (
        "import sys, time\n"
        "from batch.service.spool.settle import open_for_writing\n"
        "seen, end = set(), time.monotonic() + 2\n"
        "while time.monotonic() < end:\n"
        "    seen.add(open_for_writing(sys.argv[1]))\n"
        "print(sorted(map(str, seen)))\n"
    )
    w = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    a = subprocess.run([sys.executable, "-c", asker, str(path)], capture_output=True, text=True, timeout=60)
    worst = float(w.communicate(timeout=60)[0])
    assert a.returncode == 0, a.stderr  # SIGIO would have ended it (rc -29)
    assert a.stdout.strip() == "['False', 'True']"
    assert worst < 0.5  # the writer was never held up for long (lease-break-time is 45 s)


def test_a_file_is_complete_once_unchanged_for_settle_seconds(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("prompt: hi\n")
    tracker = SettleTracker(0.3)
    first = tracker.check(path)
    assert not first.complete and 0.25 < first.retry_in <= 0.3
    time.sleep(0.2)
    with open(path, "a") as fh:
        fh.write("tags: [x]\n")
    changed = tracker.check(path)
    assert not changed.complete and changed.retry_in > 0.25  # the wait starts again at a change
    time.sleep(changed.retry_in + 0.02)
    assert tracker.check(path).complete


def test_a_share_with_a_skewed_clock_cannot_shorten_the_wait(tmp_path):
    path = tmp_path / "skewed.yaml"
    path.write_text("prompt: hi\n")
    future = time.time() + 3600  # the share's clock is an hour ahead: the old rule would wait an hour
    os.utime(path, (future, future))
    tracker = SettleTracker(0.2)
    assert not tracker.check(path).complete
    time.sleep(0.25)
    assert tracker.check(path).complete
    # timestamps in the past prove nothing where no one can say whether a writer has the file (a symlink here)
    link = tmp_path / "link.yaml"
    link.symlink_to(path)
    old(link)
    assert not tracker.check(link).complete


@linux_only
def test_old_files_are_complete_at_first_sight_unless_a_writer_holds_them(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("prompt: hi\n")
    later = time.time() + 120  # first seen two minutes after its last change (its ctime too: utime sets that)
    assert SettleTracker(5.0).check(path, now=later).complete  # found an old file at start: no wait
    with open(path, "a"):
        verdict = SettleTracker(5.0).check(path, now=later)
    assert (verdict.complete, verdict.state) == (False, WRITING)
    assert not SettleTracker(5.0).check(path, now=time.time() + 30).complete  # younger than 60 s: waits
    old(path, 3600)  # an old mtime (cp -p, rsync -t) on a file changed just now: its ctime says so
    assert not SettleTracker(5.0).check(path).complete


@linux_only
def test_a_file_held_open_waits_for_the_writer_however_long_it_pauses(tmp_path):
    path = tmp_path / "slow.yaml"
    tracker = SettleTracker(0.1, wait_limit=1.0)
    writer = open(path, "w")
    writer.write("id: slow\n")
    writer.flush()
    verdicts = []
    deadline = time.monotonic() + 1.6
    while time.monotonic() < deadline:
        verdicts.append(tracker.check(path))
        time.sleep(0.05)
    assert not any(v.complete for v in verdicts)
    held = [v for v in verdicts if v.state == WRITING]
    assert held and sum(v.newly_held for v in verdicts) == 1  # one log line's worth, not one per look
    assert all(v.retry_in is not None and v.retry_in <= 0.5 for v in held if v.held_for <= 1.0)
    assert sum(v.newly_overdue for v in verdicts) == 1
    assert verdicts[-1].retry_in is None and verdicts[-1].held_for > 1.0  # past wait_limit: no more polling
    writer.write("prompt: hi\n")
    writer.close()
    assert not tracker.check(path).complete  # it changed: settle_seconds again
    time.sleep(0.15)
    done = tracker.check(path)
    assert (done.complete, done.state, done.retry_in) == (True, COMPLETE, None)


def test_files_no_longer_seen_are_forgotten(tmp_path):
    tracker = SettleTracker(0.1)
    paths = []
    for i in range(50):
        paths.append(tmp_path / f"{i}.yaml")
        paths[-1].write_text("x")
        tracker.check(paths[-1])
    assert len(tracker) == 50
    tracker.retain(paths[:3])
    assert len(tracker) == 3
    tracker.forget(paths[0])
    assert len(tracker) == 2
    with pytest.raises(FileNotFoundError):
        tracker.check(tmp_path / "gone.yaml")


# the spool ---------------------------------------------------------------------------------------


@linux_only
def test_pending_never_offers_a_job_file_held_open(tmp_path):
    spool = Spool(tmp_path / "jobs", lease_seconds=60, settle_seconds=0.1).ensure()
    writer = open(spool.inbox / "half.yaml", "w")
    writer.write("id: half\nprompt: Describe.\n")  # valid YAML on its own
    writer.flush()
    assert spool.pending(now=time.time() + 1e6)[0] == []  # however old it looks at first sight
    time.sleep(0.3)
    ready, next_ready = spool.pending()
    assert ready == [] and next_ready is not None and next_ready - time.time() <= 0.5
    writer.write("inputs: a.png\n")
    writer.close()
    ready, next_ready = spool.pending()  # the close event's look: changed, so settle_seconds from now
    assert ready == [] and 0 < next_ready - time.time() <= 0.1
    time.sleep(next_ready - time.time() + 0.01)
    assert [p.name for p in spool.pending()[0]] == ["half.yaml"]


def reject(spool: Spool, name: str, text: str) -> Path:
    """A job file dropped, claimed and rejected, as the worker does."""
    (spool.inbox / name).write_text(text)
    claim = spool.claim(spool.pending(now=time.time() + 120)[0][0])
    return spool.finish(claim, JobState.REJECTED, "the YAML is cut short")


def test_a_rejected_file_that_changes_goes_back_to_the_inbox_and_one_that_does_not_stays(tmp_path):
    spool = Spool(tmp_path / "jobs", settle_seconds=0.1).ensure()
    half = reject(spool, "half.yaml", "id: half\nprompt: 'Describe\n")
    kept = reject(spool, "kept.yaml", "prompt: [\n")
    assert (spool.rejected / "half.yaml.reason.txt").exists()
    records = sorted(p.name for p in spool.rejected.iterdir() if p.name.startswith("."))
    assert records == [".half.yaml.rejected.json", ".kept.yaml.rejected.json"]
    assert json.loads((spool.rejected / ".half.yaml.rejected.json").read_text())["sha256"]
    assert spool.reconsider_rejected() == []
    os.utime(kept)  # touched: the same bytes are not read as a job again
    with open(half, "a") as fh:
        fh.write(" the photo.'\ninputs: a.png\n")  # the rest of the copy lands in rejected/
    moved: list[Path] = []
    deadline = time.monotonic() + 5
    while not moved and time.monotonic() < deadline:
        moved = spool.reconsider_rejected()
        time.sleep(0.05)
    assert moved == [spool.inbox / "half.yaml"]
    assert moved[0].read_text().endswith("inputs: a.png\n")
    assert sorted(p.name for p in spool.rejected.iterdir()) == [".kept.yaml.rejected.json", "kept.yaml", *[
        "kept.yaml.reason.txt"]]  # fmt: skip
    time.sleep(1.1)
    assert spool.reconsider_rejected() == []  # kept.yaml never changed its bytes


def test_a_file_rejected_before_records_were_kept_is_left_until_it_changes(tmp_path):
    spool = Spool(tmp_path / "jobs", settle_seconds=0.1).ensure()
    (spool.rejected / "legacy.yaml").write_text("prompt: [\n")
    (spool.rejected / "legacy.yaml.reason.txt").write_text("bad\n")
    assert spool.reconsider_rejected() == []
    assert (spool.rejected / ".legacy.yaml.rejected.json").exists()
    (spool.rejected / "legacy.yaml").write_text("prompt: fixed\n")  # fixed in place in rejected/
    time.sleep(1.1)
    assert spool.reconsider_rejected() == []  # changed: waits settle_seconds like any file
    time.sleep(1.1)
    assert spool.reconsider_rejected() == [spool.inbox / "legacy.yaml"]
    assert list(spool.rejected.iterdir()) == []


def test_a_file_that_changed_while_it_was_judged_is_looked_at_again(tmp_path):
    spool = Spool(tmp_path / "jobs", settle_seconds=0.1).ensure()
    (spool.inbox / "racy.yaml").write_text("prompt: [\n")
    claim = spool.claim(spool.pending(now=time.time() + 120)[0][0])
    with open(claim.path, "a") as fh:  # after the claim, before the rejection: what was read is unknown
        fh.write("]\n")
    spool.finish(claim, JobState.REJECTED, "cut short")
    assert json.loads((spool.rejected / ".racy.yaml.rejected.json").read_text())["sha256"] is None
    moved: list[Path] = []
    deadline = time.monotonic() + 5
    while not moved and time.monotonic() < deadline:
        moved = spool.reconsider_rejected()
        time.sleep(0.05)
    assert moved == [spool.inbox / "racy.yaml"]
