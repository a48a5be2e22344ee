"""Running a peer benchmark in its own process, and saying in words why one gave no figures.

A peer is a script that prints one JSON object as its last line of standard output. Whatever else happens (a
signal, a non-zero exit, a missing package, a time-out, output that is not JSON), the outcome carries a cause a
reader can act on, and the report shows the peer as FAILED instead of leaving its rows out.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

SIGNAL_CAUSES = {
    signal.SIGILL: "illegal instruction, the library was built for a CPU feature this machine lacks",
    signal.SIGSEGV: "segmentation fault, a crash inside the peer's native code",
    signal.SIGBUS: "bus error, a crash inside the peer's native code (or a memory-mapped file that shrank)",
    signal.SIGABRT: "aborted, an assertion inside the peer's native code failed",
    signal.SIGKILL: "killed from outside, most often by the kernel's out-of-memory killer",
    signal.SIGFPE: "arithmetic fault inside the peer's native code",
}
_MISSING = re.compile(r"ModuleNotFoundError: No module named '([^']+)'")
_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


@dataclass(frozen=True)
class PeerOutcome:
    """A peer's figures, or the reason it has none."""

    name: str
    figures: dict[str, Any] | None
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def signal_cause(returncode: int) -> str:
    """'SIGILL: illegal instruction, ...' for a process that a signal ended (returncode -N)."""
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"ended by signal {-returncode}"
    cause = SIGNAL_CAUSES.get(sig)
    return f"{sig.name}: {cause}" if cause else f"{sig.name}: ended by a signal"


def failure_cause(returncode: int, stderr: str, install_hint: str = "") -> str:
    """Why a peer that exited with `returncode` failed, from its exit status and standard error."""
    if returncode < 0:
        return signal_cause(returncode)
    missing = _MISSING.findall(stderr)
    if missing:
        hint = f" ({install_hint})" if install_hint else ""
        return f"missing package {missing[-1].split('.')[0]}{hint}"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.match(line)]
    detail = errors[-1] if errors else (lines[-1] if lines else "no message")
    return f"exit status {returncode}: {detail[:300]}"


def run_peer(
    name: str, command: list[str], timeout_s: float, env: dict[str, str] | None = None, install_hint: str = ""
) -> PeerOutcome:
    """Run one peer; its standard error goes to a log the caller prints only when the peer fails."""
    print("$ " + " ".join(command), flush=True)
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as exc:
        _show_tail(exc.stderr)
        return PeerOutcome(name, None, f"timed out after {timeout_s:.0f} s (raise --peer-timeout)")
    except OSError as exc:
        return PeerOutcome(name, None, f"cannot start: {exc}")
    if proc.returncode:
        _show_tail(proc.stderr)
        return PeerOutcome(name, None, failure_cause(proc.returncode, proc.stderr, install_hint))
    lines = proc.stdout.strip().splitlines()
    try:
        figures = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        figures = None
    if not isinstance(figures, dict):
        _show_tail(proc.stderr)
        return PeerOutcome(name, None, "printed no result (its last line of output is not a JSON object)")
    return PeerOutcome(name, figures)


def _show_tail(stderr: str | bytes | None) -> None:
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    if stderr:
        print(stderr[-2000:], flush=True)
