"""Permanent faults are not waited out: a media folder the worker may not write fails its sidecars, not the job.

Permission bits mean nothing to root, and CI runs as root, so the worker runs as another user here (`setpriv`
to nobody, 65534) over a temporary spool, database and media that user owns, with one media folder made read-only
(0555) for it. Without root, the test user itself is that other user. Where neither works the test says why.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spool_env import SpoolEnv, wait_for

from batch.service.faults import is_passing

NOBODY = 65534


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_permission_errors_pass_only_for_the_spool_and_the_database(code: int) -> None:
    assert not is_passing(OSError(code, os.strerror(code)))  # a job's own files: permanent
    assert is_passing(OSError(code, os.strerror(code)), spool=True)  # the worker's own folders: the machine's


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.ESTALE, errno.ENOTCONN])
def test_faults_of_the_machine_pass_everywhere(code: int) -> None:
    assert is_passing(OSError(code, os.strerror(code))) and is_passing(OSError(code, ""), spool=True)


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.EISDIR, errno.ENOENT])
def test_what_a_name_is_never_passes(code: int) -> None:
    assert not is_passing(OSError(code, os.strerror(code)), spool=True)


def _as_other_user() -> list[str]:
    """The command prefix that runs a process as a user without root's override of permission bits."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux): cannot drop to a user that permission bits bind")
    drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # the worker starts its decoding child from the same interpreter: the probe does too
    probe = [sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import batch'])"]
    # an interpreter under a folder only root may enter (/root/.pyenv) needs CAP_DAC_READ_SEARCH to be reached;
    # that capability lets the worker read and search folders, never write where permission bits say no
    reach = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    errors = []
    for prefix in (drop, [*drop, *reach]):
        tried = subprocess.run([*prefix, *probe], capture_output=True, text=True, cwd="/")
        if tried.returncode == 0 and not tried.stderr:
            return prefix
        errors.append(tried.stderr.strip()[-200:])
    pytest.skip(f"user {NOBODY} cannot run this Python and vlbatch: {errors}")


@pytest.fixture
def shared(tiny_onnx: Path) -> Iterator[Path]:
    """A folder the other user can reach (pytest's own temp folder is root's alone), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="vlbatch-perm-", dir="/tmp"))
    root.chmod(0o755)
    shutil.copytree(tiny_onnx, root / "model")
    yield root
    for folder, _dirs, _files in os.walk(root):
        os.chmod(folder, 0o755)
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def env(shared: Path) -> SpoolEnv:
    e = SpoolEnv(shared, shared / "model")
    e.write_config(give_up_seconds=900)  # a fault taken for a passing one would be waited out past the test
    e.image("locked/a.jpg", seed=1)
    e.image("locked/b.jpg", seed=2)
    e.image("open/c.jpg", seed=3)
    return e


def _hand_over(env: SpoolEnv) -> None:
    """Give the temp tree to the other user (as root), then make one media folder read-only for it."""
    if os.geteuid() == 0:
        for folder, dirs, files in os.walk(env.root):
            for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
                os.lchown(name, NOBODY, NOBODY)
    (env.media / "locked").chmod(0o555)


def _child_env(env: SpoolEnv) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if not k.startswith("VLBATCH_")}
    return {**keep, "HOME": str(env.root), "XDG_CACHE_HOME": str(env.root / "cache"), "HF_HOME": str(env.root / "hf")}


JOB = "prompt: Describe it.\ninputs: ../../media/\nsidecar: true\n"


def _assert_skipped_not_waited(env: SpoolEnv, log: str) -> None:
    job = env.job("captions")
    assert job["state"] == "done" and job["answered"] == 3 and job["failed_media"] == 0, job["error"]
    assert (env.jobs / "done" / "captions.yaml").exists()
    skipped = [line for line in log.splitlines() if "event=sidecar.skipped" in line]
    assert len(skipped) == 2, log
    for name in ("a", "b"):
        line = next(line for line in skipped if f"path={env.media / 'locked' / name}.txt" in line)
        assert "reason=" in line and "EACCES" in line and "Permission denied" in line
    assert "event=worker.fault" not in log and "event=job.handed_back" not in log
    assert sorted(os.listdir(env.media / "locked")) == ["a.jpg", "b.jpg"]  # no sidecar, no temp file
    assert (env.media / "open" / "c.txt").read_bytes()  # the folder it may write gets its sidecar
    with sqlite3.connect(env.db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_run_skips_sidecars_it_may_not_write_and_finishes(env: SpoolEnv) -> None:
    prefix = _as_other_user()
    env.drop("captions.yaml", JOB)
    _hand_over(env)
    done = subprocess.run([*prefix, *env.cli("run")], capture_output=True, text=True, timeout=240, env=_child_env(env))
    assert done.returncode == 0, done.stderr
    _assert_skipped_not_waited(env, done.stderr)


def test_watch_fails_no_job_over_a_read_only_media_folder(env: SpoolEnv) -> None:
    prefix = _as_other_user()
    _hand_over(env)
    log = env.root / "watch.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [*prefix, *env.cli("watch")], stdout=subprocess.DEVNULL, stderr=err, text=True, env=_child_env(env)
        )
    try:
        wait_for(lambda: "event=worker.watching" in log.read_text(), timeout=120)
        env.drop("captions.yaml", JOB)
        if os.geteuid() == 0:
            os.chown(env.inbox / "captions.yaml", NOBODY, NOBODY)
        wait_for(lambda: (env.job("captions") or {}).get("state") in ("done", "failed"), timeout=120)
        time.sleep(0.5)  # the move to done/ follows the commit
        wait_for(lambda: (env.jobs / "done" / "captions.yaml").exists(), timeout=30)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert proc.returncode == 0
    _assert_skipped_not_waited(env, log.read_text())
