"""The fault suite's tools: real vlbatch processes with test-only faults loaded, small full file systems, checks.

Every case ends with the same questions: did each dropped job end in done/, failed/ or rejected/ with its
reason, was nothing answered twice, is the worker still running (or did it exit with its documented code), and
does the database pass `PRAGMA integrity_check`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from spool_env import SpoolEnv, wait_for

PLUGIN = Path(__file__).resolve().parent / "plugin"  # sitecustomize.py with the injected faults


def fault_env(**extra: str) -> dict[str, str]:
    """The environment for a vlbatch process with the fault plugin loaded."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGIN), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def fault_image(path: Path, kind: str) -> Path:
    """A `.png` that the plugin's decoder turns into `kind`: segv, hang, alloc or slow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(f"VLBFAULT:{kind}\n".encode())
    return path


def run(env: SpoolEnv, *args: str, timeout: float = 120, **extra: str) -> subprocess.CompletedProcess:
    """`vlbatch run` (or another command) to the end, with the fault plugin loaded."""
    return subprocess.run(env.cli(*args), capture_output=True, text=True, timeout=timeout, env=fault_env(**extra))


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def settled(env: SpoolEnv) -> dict[str, list[str]]:
    """Job file names in each final folder (reason files left out), and what is still in inbox/ and work/."""
    out = {}
    for folder in ("inbox", "work", "done", "failed", "rejected"):
        path = env.jobs / folder
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        out[folder] = [n for n in names if n.endswith(".yaml")]
    return out


def reason(env: SpoolEnv, folder: str, name: str) -> str:
    return (env.jobs / folder / f"{name}.reason.txt").read_text()


def assert_sound(env: SpoolEnv) -> None:
    """The database is intact and no job owns two answers for the same media."""
    db = sqlite3.connect(env.db_path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        twice = db.execute(
            "SELECT jr.job_id, r.media_paths, count(*) FROM job_results jr JOIN results r ON r.id = jr.result_id "
            "GROUP BY jr.job_id, r.media_paths HAVING count(*) > 1"
        ).fetchall()
        assert not twice, f"answered twice: {twice}"
        over = db.execute("SELECT id, answered, reused, failed_media, media_count FROM jobs").fetchall()
        for job_id, answered, reused, failed, media in over:
            assert (answered or 0) + (reused or 0) + (failed or 0) <= (media or 0), job_id
    finally:
        db.close()


@contextlib.contextmanager
def small_filesystem(where: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted at `where` (root only); skips the test where mounting is not allowed."""
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(where)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the injected-error tests cover ENOSPC")
    try:
        yield where
    finally:
        gc.collect()  # SQLite connections left to the garbage collector would keep the mount busy
        for _ in range(20):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system under `folder` to the last byte; returns the filler file (delete it to free space)."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            block = b"\0" * size
            with contextlib.suppress(OSError):
                while True:
                    out.write(block)
    return filler


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def decoder_child(pid: int, timeout: float = 30) -> int:
    """The worker's decoding child process (python -m batch.infer.decode)."""

    def find() -> int | None:
        for child in children(pid):
            with contextlib.suppress(OSError):
                if b"batch.infer.decode" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return child
        return None

    return wait_for(find, timeout=timeout)
