"""On a terminal, progress bars and log lines share stderr without ever sharing a line.

A real `vlbatch run` on the tiny model is run under a pseudo terminal (python's pty module), its output read as
the terminal got it, and every logfmt record is checked to start at the beginning of a line.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest
from spool_env import SpoolEnv

pytestmark = pytest.mark.slow

CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm moves up a line with ESC[A between bars
QUIET_AFTER_EXIT_S = 0.5  # the decoder child may still hold the terminal a moment after the worker has exited


def run_on_a_terminal(argv: list[str], cwd: Path, timeout: float = 180.0) -> tuple[int, str]:
    """Run `argv` with stdin, stdout and stderr on a new 120x40 pseudo terminal; (exit code, what it showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, close_fds=True)
    os.close(slave)
    try:
        shown = _read_until_quiet(master, proc, time.monotonic() + timeout)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return proc.wait(10), shown.decode("utf-8", errors="replace")


def _read_until_quiet(master: int, proc: subprocess.Popen, deadline: float) -> bytes:
    """Everything written to the terminal until the process has exited and nothing more comes."""
    chunks: list[bytes] = []
    while time.monotonic() < deadline:
        exited = proc.poll() is not None
        ready, _, _ = select.select([master], [], [], QUIET_AFTER_EXIT_S if exited else 0.2)
        if not ready:
            if exited:
                return b"".join(chunks)
            continue
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            return b"".join(chunks)
        if not data:
            return b"".join(chunks)
        chunks.append(data)
    raise AssertionError(f"{argv_of(proc)} did not finish within the time limit; it showed: {b''.join(chunks)!r}")


def argv_of(proc: subprocess.Popen) -> str:
    return " ".join(map(str, proc.args)) if isinstance(proc.args, list) else str(proc.args)


def pieces(shown: str) -> list[str]:
    """The terminal output cut at every line feed and carriage return, cursor moves taken out."""
    return re.split(r"[\r\n]", CURSOR_MOVES.sub("", shown))


def test_log_lines_never_land_on_a_progress_bar(tiny_onnx: Path, tmp_path: Path) -> None:
    env = SpoolEnv(tmp_path, tiny_onnx)
    env.write_config(settle=0.0)
    for i in range(3):
        env.image(f"p{i}.png", seed=i)
        env.drop(f"j{i}.yaml", f"prompt: Describe.\ninputs: ../../media/p{i}.png\nmax_new_tokens: 4\n")

    code, shown = run_on_a_terminal(env.cli("run"), cwd=tmp_path)

    assert code == 0, shown
    assert sorted(p.name for p in (env.jobs / "done").iterdir()) == ["j0.yaml", "j1.yaml", "j2.yaml"], shown
    records = [piece for piece in pieces(shown) if "ts=" in piece]
    assert len(records) >= 3 * 3, shown  # job.started, answer.done and job.done per job at least
    misplaced = [piece for piece in records if not piece.startswith("ts=")]
    assert misplaced == [], f"log records that do not start a line: {misplaced}"
    assert any(re.search(r"j\d: .*\d+/1 \[", piece) for piece in pieces(shown)), f"no job bar was drawn: {shown!r}"
    assert any(re.search(r"jobs: ", piece) for piece in pieces(shown)), f"no jobs bar was drawn: {shown!r}"


def test_without_a_terminal_there_are_no_bars(tiny_onnx: Path, tmp_path: Path) -> None:
    env = SpoolEnv(tmp_path, tiny_onnx)
    env.write_config(settle=0.0)
    env.image("p.png")
    env.drop("j.yaml", "prompt: Describe.\ninputs: ../../media/p.png\nmax_new_tokens: 4\n")
    done = subprocess.run(env.cli("run"), cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert "\r" not in done.stderr and "/1 [" not in done.stderr
    assert lines[0].startswith("ts=") and "event=config" in lines[0]
    assert all(line.startswith("ts=") for line in lines[:-1]) and lines[-1].startswith("1 jobs: 1 done")
    assert done.stdout == ""
