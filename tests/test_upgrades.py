"""Upgrading a running installation, with real database files and real processes: an older vlbatch refuses a
database that a newer one migrated (one line, exit code 2, not a byte written, no journal made); a newer vlbatch
migrates an older database only when no worker of the older one holds a worker slot or beats in the `workers`
table (exit code 3 naming them, `watch` waits for them); two starting together migrate it once; a migration cut
short leaves the old schema as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils
from spool_env import SpoolEnv, wait_for

from batch.service.store.store import (
    DatabaseTooNew,
    OlderWorkersRunning,
    Store,
    connect_read_only,
    known_migrations,
    migrations,
    pending_migrations,
)
from batch.service.worker.slots import WorkerSlots, held_by_others

RELEASE_DB = Path(__file__).resolve().parent / "data" / "vlbatch-0.1.0.db"  # as tests/test_migrations.py uses it
FUTURE = "m009_future_column"
BEAT = 0.3


@pytest.fixture
def env(tmp_path: Path) -> SpoolEnv:
    """An installation whose inbox stays empty: `run` opens the database and never loads the (empty) model folder."""
    (tmp_path / "model").mkdir()
    e = SpoolEnv(tmp_path, tmp_path / "model")
    e.write_config(heartbeat_seconds=BEAT)
    return e


def newer_database(path: Path) -> None:
    """A database as a newer vlbatch leaves it: every migration of this one, then one more (a new column)."""
    store = Store(path)
    with store.db.atomic():
        store.db["results"].add_column("future", str)
        store.db[migrations.migrations_table].insert(
            {"migration_set": migrations.name, "name": FUTURE, "applied_at": "2027-01-01 00:00:00+00:00"}
        )
    store.close()


def older_database(path: Path, stop_before: str = "m008_decode_rows") -> None:
    """A database as the vlbatch before `stop_before` leaves it (its migrations up to the one before)."""
    db = sqlite_utils.Database(path)
    db.enable_wal()
    migrations.apply(db, stop_before=stop_before)
    db.close()


def applied(path: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        return [row[0] for row in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY rowid")]
    finally:
        conn.close()


def files_beside(path: Path) -> dict[str, str]:
    """sha256 of the database and of every file beside it named after it (-wal, -shm, -journal, .lock)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.parent.iterdir())
        if p.name.startswith(path.name)
    }


def run_cli(env: SpoolEnv, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(env.cli(*args), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("vlbatch: error:")]


def hold_slot(lock: Path) -> subprocess.Popen:
    """Another process that holds a worker slot (flock on its lock file), as a running worker does, until killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def end(process: subprocess.Popen) -> None:
    process.kill()
    process.wait(timeout=10)


# an older vlbatch meets a newer database ------------------------------------------------------------------------
COMMANDS = [
    ["run"],
    ["watch"],
    ["status"],
    ["results"],
    ["cancel", "some-job"],
    ["pause"],
    ["db", "size"],
    ["db", "backup", "backup.db"],
    ["db", "prune", "--older-than", "1d", "--yes"],
    ["db", "vacuum"],
    ["gallery", "gallery-out"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_older_vlbatch_refuses_a_newer_database_and_writes_nothing(env: SpoolEnv, command: list[str]):
    newer_database(env.db_path)
    before = files_beside(env.db_path)
    assert set(before) == {"vlbatch.db", "vlbatch.db.lock"}  # closed cleanly: no -wal, no -shm
    done = run_cli(env, *command)
    assert done.returncode == 2, done.stderr
    (line,) = error_lines(done.stderr)
    assert line == (
        f"vlbatch: error: {env.db_path} was migrated by a newer vlbatch ({FUTURE}; this vlbatch "
        f"{__import__('batch').__version__} knows up to {known_migrations()[-1]}): upgrade vlbatch here "
        "(install the newer release, with its extras) and start it again; nothing was changed"
    )
    assert "Traceback" not in done.stderr
    assert files_beside(env.db_path) == before  # byte for byte, and no journal made
    assert not (env.root / "backup.db").exists() and not (env.root / "gallery-out").exists()


def test_an_older_vlbatch_refuses_a_newer_database_that_a_newer_worker_has_open(env: SpoolEnv):
    newer_database(env.db_path)
    newer = sqlite3.connect(env.db_path)  # a newer worker's connection: its -wal and -shm are there
    newer.execute("SELECT count(*) FROM results").fetchone()
    try:
        before = {name: digest for name, digest in files_beside(env.db_path).items() if not name.endswith("-shm")}
        assert "vlbatch.db-wal" in before
        for command in (["status"], ["run"]):
            done = run_cli(env, *command)
            assert done.returncode == 2 and len(error_lines(done.stderr)) == 1, done.stderr
        after = files_beside(env.db_path)
        assert {name: digest for name, digest in after.items() if not name.endswith("-shm")} == before
    finally:
        newer.close()


def test_every_way_in_refuses_a_newer_database(tmp_path: Path):
    path = tmp_path / "vlbatch.db"
    newer_database(path)
    before = files_beside(path)
    for open_it in (Store, connect_read_only, pending_migrations):
        with pytest.raises(DatabaseTooNew, match=FUTURE):
            open_it(path)
    assert files_beside(path) == before


def test_a_worker_that_opened_the_database_refuses_it_once_a_newer_one_migrated(tmp_path: Path):
    """Between a worker's open and its slot a newer vlbatch may migrate: the worker looks again after its slot."""
    path = tmp_path / "vlbatch.db"
    store = Store(path)
    store.check_not_newer()
    with sqlite_utils.Database(path) as newer:
        newer[migrations.migrations_table].insert({"migration_set": migrations.name, "name": FUTURE})
    with pytest.raises(DatabaseTooNew):
        store.check_not_newer()
    store.close()


# a newer vlbatch meets an older database ------------------------------------------------------------------------
def test_an_older_database_is_not_migrated_while_another_process_holds_a_slot(env: SpoolEnv):
    shutil.copy(RELEASE_DB, env.db_path)
    holder = hold_slot(env.jobs / ".slots" / "older-model-0123456789ab" / "0.lock")
    try:
        for command in (["run"], ["status"]):
            done = run_cli(env, *command)
            assert done.returncode == 3, done.stderr
            (line,) = error_lines(done.stderr)
            worker = f"{os.uname().nodename}:{holder.pid}"
            assert f"({worker} (holds worker slot older-model-0123456789ab/0))" in line
            assert line.endswith(f"not migrated; stop the running workers ({worker}), then start this one")
            assert applied(env.db_path) == ["m001_initial"]
    finally:
        end(holder)
    done = run_cli(env, "run")
    assert done.returncode == 0, done.stderr
    assert applied(env.db_path) == known_migrations()


def test_an_older_database_is_not_migrated_while_a_worker_beats_in_it(env: SpoolEnv):
    """A worker on another machine is seen by its heartbeat (its slot lock is on its own machine)."""
    older_database(env.db_path)  # m001..m007: the workers table is there
    now = datetime.now(timezone.utc)
    row = {"host": "other-host", "pid": 4242, "command": "watch", "state": "busy", "heartbeat_seconds": 5.0}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    here = socket.gethostname()
    with sqlite_utils.Database(env.db_path) as db:
        db["workers"].insert({"id": "other-host:4242", **row, "heartbeat_utc": now.isoformat()})
        # gone: stopped, silent for two beats, or a process of this host that no longer exists
        db["workers"].insert({"id": "other-host:1", **row, "state": "stopped", "heartbeat_utc": now.isoformat()})
        stale = (now - timedelta(seconds=11)).isoformat()
        db["workers"].insert({"id": "other-host:2", **row, "heartbeat_utc": stale})
        pid = int(dead.stdout)
        db["workers"].insert({"id": f"{here}:{pid}", **row, "host": here, "pid": pid, "heartbeat_utc": now.isoformat()})
    done = run_cli(env, "run")
    assert done.returncode == 3, done.stderr
    (line,) = error_lines(done.stderr)
    assert "(other-host:4242 (watch, busy, heartbeat " in line
    assert line.endswith("stop the running workers (other-host:4242), then start this one")
    assert "m008_decode_rows" not in applied(env.db_path)
    with sqlite_utils.Database(env.db_path) as db:  # it stopped (its last beat says so)
        db["workers"].update("other-host:4242", {"state": "stopped"})
    done = run_cli(env, "run")
    assert done.returncode == 0, done.stderr
    assert applied(env.db_path) == known_migrations()


def test_watch_waits_for_the_older_workers_then_migrates(env: SpoolEnv):
    shutil.copy(RELEASE_DB, env.db_path)
    holder = hold_slot(env.jobs / ".slots" / "older-model-0123456789ab" / "0.lock")
    log = env.root / "watch.log"
    try:
        watcher = env.spawn("watch", log=log)
        wait_for(lambda: "event=database.upgrade_waiting" in log.read_text(), timeout=30)
        time.sleep(6 * BEAT)  # several looks, one line: it says so again only when who runs changes
        assert log.read_text().count("event=database.upgrade_waiting") == 1
        assert watcher.poll() is None and applied(env.db_path) == ["m001_initial"]
    finally:
        end(holder)
    try:
        wait_for(lambda: applied(env.db_path) == known_migrations(), timeout=30)
    finally:
        watcher.kill()  # it goes on to load the model, which this test does not have
        watcher.wait(timeout=10)
    assert "vlbatch: error" not in log.read_text().split("event=database.upgrade_waiting")[0]


def test_a_stop_signal_ends_a_watch_that_waits_for_older_workers(env: SpoolEnv):
    shutil.copy(RELEASE_DB, env.db_path)
    holder = hold_slot(env.jobs / ".slots" / "older-model-0123456789ab" / "0.lock")
    log = env.root / "watch.log"
    try:
        watcher = env.spawn("watch", log=log)
        wait_for(lambda: "event=database.upgrade_waiting" in log.read_text(), timeout=30)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=10) == -signal.SIGTERM
        assert applied(env.db_path) == ["m001_initial"]
    finally:
        end(holder)


def test_slots_held_by_this_process_are_not_another_s(tmp_path: Path):
    mine = WorkerSlots(tmp_path, "model@0123456789ab", 2)
    assert mine.take()
    assert held_by_others(tmp_path) == []
    holder = hold_slot(mine.folder / "1.lock")
    try:
        (slot,) = held_by_others(tmp_path)
        assert (slot.path.name, slot.pid) == ("1.lock", holder.pid)
    finally:
        end(holder)
        mine.release()
    assert held_by_others(tmp_path) == []


def test_two_processes_starting_together_migrate_an_older_database_once(env: SpoolEnv):
    shutil.copy(RELEASE_DB, env.db_path)
    start = time.time() + 2.0  # each imports vlbatch first, then they open the database at the same instant
    script = textwrap.dedent(
        f"""
        import sys, time
        from batch.service.store.store import Store
        time.sleep(max(0.0, {start} - time.time()))
        Store(sys.argv[1], spool=sys.argv[2]).close()
        print("opened")
        """
    )
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(env.db_path), str(env.jobs)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for starter in starters:
        out, err = starter.communicate(timeout=60)
        assert (starter.returncode, out.strip(), err) == (0, "opened", "")
    names = applied(env.db_path)
    assert names == known_migrations() and len(set(names)) == len(names)
    # 0.1.0's three jobs got one run each (the migration that makes runs ran once)
    with sqlite_utils.Database(env.db_path) as db:
        assert db["runs"].count == db["jobs"].count == 3


def test_a_migration_cut_short_leaves_the_old_schema(tmp_path: Path):
    """A newer vlbatch killed (SIGKILL, a power cut) in its last migration: every migration before it, done in the
    same transaction, is undone too; the file is the 0.1.0 one it was, and opens and migrates as before."""
    path = tmp_path / "vlbatch.db"
    shutil.copy(RELEASE_DB, path)
    schema = sqlite3.connect(path).execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    script = textwrap.dedent(
        f"""
        import time
        from batch.service.store.store import Store, migrations

        @migrations()
        def {FUTURE}(db):
            db["results"].add_column("future", str)
            print("migrating", flush=True)
            time.sleep(600)

        Store({str(path)!r})
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "migrating"
    reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # meanwhile, a reader sees 0.1.0's schema
    assert [r[0] for r in reader.execute("SELECT name FROM _sqlite_migrations")] == ["m001_initial"]
    reader.close()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == schema
    assert [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")] == ["m001_initial"]
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()
    Store(path).close()
    assert applied(path) == known_migrations()


def test_a_failing_migration_leaves_the_old_schema(tmp_path: Path):
    path = tmp_path / "vlbatch.db"
    older_database(path, stop_before="m007_workers_control_and_links")
    schema = sqlite3.connect(path).execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall()
    script = textwrap.dedent(
        f"""
        from batch.service.store.store import Store, migrations

        @migrations()
        def {FUTURE}(db):
            db["results"].add_column("future", str)
            raise RuntimeError("a migration that fails")

        Store({str(path)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "a migration that fails" in done.stderr
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name").fetchall() == schema
    conn.close()
    assert applied(path) == known_migrations()[:6]


def test_a_new_database_is_made_whoever_holds_slots(env: SpoolEnv):
    """Nothing older can be using a database that has no migration yet: it is made at once."""
    holder = hold_slot(env.jobs / ".slots" / "model-0123456789ab" / "0.lock")
    try:
        Store(env.db_path, spool=env.jobs).close()
    finally:
        end(holder)
    assert applied(env.db_path) == known_migrations()


def test_the_refusal_names_what_runs(tmp_path: Path):
    path = tmp_path / "vlbatch.db"
    shutil.copy(RELEASE_DB, path)
    holder = hold_slot(tmp_path / "jobs" / ".slots" / "m-0123456789ab" / "3.lock")
    try:
        with pytest.raises(OlderWorkersRunning) as raised:
            Store(path, spool=tmp_path / "jobs")
    finally:
        end(holder)
    assert raised.value.pending == known_migrations()[1:]
    assert [w.name for w in raised.value.workers] == [f"{os.uname().nodename}:{holder.pid}"]
